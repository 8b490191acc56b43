"""Framework overhead: dtrain's training loop against a bare PyTorch loop on the same work.

    python benchmarks/overhead.py [--steps 100] [--warmup 10] [--repeats 5] [--batch-size 8] [key=value ...]
        # -> benchmarks/results/overhead.json

Both sides train the digits teacher (``recipes/teacher/digits.yaml``, any ``key=value`` override applies) on the
same in-memory digits, batch, UNet, AdamW (the recipe's ``optim``: foreach on CPU), LR warmup, global-norm
gradient clipping and EMA copies (the recipe's ``ema``, averaged with ``torch._foreach_lerp_``):

- **bare**: one hand-written loop: gather a batch, draw t and noise, v-prediction MSE, backward, clip, step,
  LR schedule, EMA. Nothing else: no logging, no callbacks, no loss bookkeeping.
- **dtrain**: the LightningModule of ``dtrain fit`` (``module_class``) under the Trainer that
  ``dtrain.lit.fit.build_trainer`` builds from the recipe (CSV logger, progress bar and logging intervals as the
  recipe sets them; periodic checkpoints and sample grids off, they are not per-step work).

The two alternate step by step in one process, on one torch thread: after each dtrain iteration a callback runs one
bare step, so both see the same load of a shared machine at a granularity of tens of milliseconds. A dtrain step is
timed from the end of one bare step to the start of the next (everything of one iteration: data, hooks, forward,
backward, clipping, optimizer, EMA, logging), a bare step around its own call; the first ``warmup`` steps of each
side are not counted. Each repeat is a fresh fit and a fresh bare loop; the report gives the medians over repeats
of the wall-clock and of the process-CPU-time rates, and their ratios (dtrain / bare).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import machine  # noqa: E402
from dtrain.config import load_recipe  # noqa: E402

RECIPE = ROOT / "recipes" / "teacher" / "digits.yaml"
OUT = ROOT / "benchmarks" / "results" / "overhead.json"


def recipe(out_dir: Path, batch_size: int, total_steps: int, overrides: list[str]) -> Any:
    return load_recipe(RECIPE, [f"out_dir={out_dir}", "logger.mode=disabled", f"data.batch_size={batch_size}",
                                f"trainer.max_steps={total_steps}", "trainer.ckpt_every_n_steps=0",
                                "trainer.sample_every_n_steps=0", "trainer.cpu_threads=1", *overrides])


# ---- (a) the bare loop --------------------------------------------------------------------------------------
class BareStep:
    """The recipe's training step written by hand. It follows the recipe: eps or v prediction on the discrete VP
    schedule (uniform integer times, CFG label dropout), ``trainer.precision`` (32-true or bf16-mixed autocast),
    ``trainer.channels_last``, ``trainer.compile`` (``nn.Module.compile``, as dtrain), ``optim.impl`` (auto: fused
    on a GPU), warmup / cosine LR over ``trainer.max_steps``, global-norm clipping, the ``ema`` copies. ``data``:
    (x, labels) on the CPU, default the digits; ``step(n)`` runs optimizer step n on its own batch."""

    def __init__(self, cfg: Any, data: tuple[Tensor, Tensor | None] | None = None,
                 device: torch.device | str = "cpu") -> None:
        from dtrain.diffusion.schedule import schedule_from_config
        from dtrain.lit.common import lr_factor
        from dtrain.models import build_model
        from dtrain.models.ema import std_to_gamma

        self.cfg, self.device = cfg, torch.device(device)
        torch.manual_seed(cfg.seed)
        if cfg.model.param not in ("eps", "v") or cfg.schedule.name not in ("ddpm", "vp_discrete"):
            raise SystemExit("bare loop: eps or v prediction on a discrete VP schedule only")
        if cfg.trainer.precision not in ("32-true", "bf16-mixed"):
            raise SystemExit(f"bare loop: trainer.precision 32-true or bf16-mixed, not {cfg.trainer.precision}")
        if data is None:
            from dtrain.data.memory import digits_arrays

            data = digits_arrays(cfg.data.split)
        self.x_all, self.y_all = data
        image = self.x_all.ndim == 4
        self.fmt = torch.channels_last if cfg.trainer.channels_last and image else torch.contiguous_format
        self.net = build_model(cfg.model).to(self.device, memory_format=self.fmt).train()
        emas = [(copy.deepcopy(self.net).requires_grad_(False).eval(), ("decay", d)) for d in cfg.ema.decays]
        emas += [(copy.deepcopy(self.net).requires_grad_(False).eval(), ("power", std_to_gamma(s)))
                 for s in cfg.ema.stds]
        self.emas = [(list(e.parameters()), rate) for e, rate in emas]
        self.params = list(self.net.parameters())
        if cfg.trainer.compile:
            self.net.compile()
        o = cfg.optim
        impl = ("fused" if self.device.type == "cuda" else "foreach") if o.impl == "auto" else o.impl
        kw = {"fused": {"fused": True}, "foreach": {"foreach": True}, "plain": {"foreach": False}}[impl]
        self.opt = torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                     weight_decay=o.weight_decay, **kw)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(
            s, warmup=o.warmup_steps, total=int(cfg.trainer.max_steps), schedule=o.lr_schedule,
            min_ratio=o.min_lr_ratio))
        ac = schedule_from_config(cfg.schedule).alphas_cumprod.float()  # [T]
        self.a_tab, self.s_tab = ac.sqrt().to(self.device), (1 - ac).sqrt().to(self.device)
        self.perm, self.pos = torch.randperm(len(self.x_all)), 0

    def batch(self) -> tuple[Tensor, Tensor | None]:
        B = self.cfg.data.batch_size
        if self.pos + B > len(self.perm):
            self.perm, self.pos = torch.randperm(len(self.x_all)), 0
        idx = self.perm[self.pos : self.pos + B]
        self.pos += B
        return self.x_all[idx], None if self.y_all is None else self.y_all[idx]

    def loss(self, x0: Tensor, y: Tensor | None) -> Tensor:
        """Noise, forward (autocast as the recipe says) and the mean squared error of the recipe's target."""
        cfg, dev = self.cfg, self.device
        B, K = x0.shape[0], cfg.model.num_classes
        x0 = x0.to(dev).contiguous(memory_format=self.fmt)
        if K > 0 and y is not None:
            drop = (torch.rand(B) < cfg.method.cfg_dropout).to(y.device)  # CPU draw, no host sync
            y = torch.where(drop, torch.full_like(y, K), y).to(dev)
        i = torch.randint(0, len(self.a_tab), (B,)).to(dev)
        shape = (B,) + (1,) * (x0.ndim - 1)
        a, s = self.a_tab[i].view(shape), self.s_tab[i].view(shape)
        eps = torch.randn_like(x0)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.trainer.precision == "bf16-mixed"):
            out = self.net(a * x0 + s * eps, i.float(), y)
        target = eps if cfg.model.param == "eps" else a * eps - s * x0
        return (out.float() - target).square().mean()

    def clip(self) -> None:
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip, foreach=True)

    @torch.no_grad()
    def ema(self, step: int) -> None:
        from dtrain.models.ema import power_beta

        for dst, (kind, v) in self.emas:
            torch._foreach_lerp_(dst, self.params, 1.0 - (power_beta(v, step) if kind == "power" else v))

    def step(self, n: int) -> None:
        loss = self.loss(*self.batch())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.clip()
        self.opt.step()
        self.sched.step()
        self.ema(n)


def bare_loop(cfg: Any, total: int, data: tuple[Tensor, Tensor | None] | None = None,
              device: torch.device | str = "cpu") -> Iterator[int]:
    """``BareStep`` for ``total`` steps, yielding after each."""
    bare = BareStep(cfg, data, device)
    for n in range(1, total + 1):
        bare.step(n)
        yield n


class PlainModule(L.LightningModule):
    """``BareStep`` as a minimal LightningModule (automatic optimisation; data, clipping, LR schedule and EMA as in
    the bare loop): what Lightning's own loop costs, without anything of dtrain."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.bare = BareStep(cfg)
        self.net = self.bare.net

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.bare.loss(batch["x"], batch.get("y"))

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Any = None) -> None:
        self.bare.clip()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.bare.ema(self.global_step)

    def configure_optimizers(self) -> Any:
        return {"optimizer": self.bare.opt, "lr_scheduler": {"scheduler": self.bare.sched, "interval": "step"}}


def plain_run(cfg: Any, callbacks: tuple[L.Callback, ...]) -> None:
    """``PlainModule`` on the recipe's data under a Trainer with every optional feature off."""
    from dtrain.data import build_datamodule

    trainer = L.Trainer(max_steps=cfg.trainer.max_steps, accelerator=cfg.trainer.accelerator, devices=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        use_distributed_sampler=False, callbacks=list(callbacks))
    trainer.fit(PlainModule(cfg), datamodule=build_datamodule(cfg.data, seed=cfg.seed))


def bare_run(cfg: Any, warmup: int, steps: int, data: tuple[Tensor, Tensor | None] | None = None,
             device: torch.device | str = "cpu") -> dict[str, float]:
    """``bare_loop`` alone: steps per wall / CPU second over ``steps`` after ``warmup`` (synchronised on a GPU),
    and the peak device memory."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    loop = bare_loop(cfg, warmup + steps, data, device)
    for _ in range(warmup):
        next(loop)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in loop:
        pass
    sync()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"steps_per_s": steps / wall, "cpu_steps_per_s": steps / cpu,
            "peak_mem_bytes": float(torch.cuda.max_memory_allocated(device)) if cuda else float("nan")}


# ---- (b) dtrain's Lightning path ----------------------------------------------------------------------------
class StepClock(L.Callback):
    """Wall and CPU time from the end of batch ``warmup - 1`` to the end of batch ``warmup + steps - 1`` (on a GPU
    synchronised at both ends), and the peak device memory in between."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.t0 = self.c0 = 0.0
        self.seconds = self.cpu_seconds = self.peak_mem_bytes = float("nan")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx not in (self.warmup - 1, self.warmup + self.steps - 1):
            return
        cuda = pl_module.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(pl_module.device)
        if batch_idx == self.warmup - 1:
            if cuda:
                torch.cuda.reset_peak_memory_stats(pl_module.device)
            self.t0, self.c0 = time.perf_counter(), time.process_time()
        else:
            self.seconds, self.cpu_seconds = time.perf_counter() - self.t0, time.process_time() - self.c0
            if cuda:
                self.peak_mem_bytes = float(torch.cuda.max_memory_allocated(pl_module.device))


class Interleaved(L.Callback):
    """After each dtrain iteration, one step of ``bare``; wall and CPU seconds of both sides over batches
    ``warmup`` .. ``warmup + steps - 1`` (see the module docstring)."""

    def __init__(self, bare: Iterator[int], warmup: int, steps: int) -> None:
        self.bare, self.warmup, self.steps = bare, warmup, steps
        self.mark: tuple[float, float] | None = None
        self.dtrain = [0.0, 0.0]  # wall, CPU seconds
        self.bare_s = [0.0, 0.0]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        w, c = time.perf_counter(), time.process_time()
        timed = self.warmup <= batch_idx < self.warmup + self.steps
        if timed and self.mark is not None:
            self.dtrain[0] += w - self.mark[0]
            self.dtrain[1] += c - self.mark[1]
        with torch.enable_grad():
            next(self.bare)
        w2, c2 = time.perf_counter(), time.process_time()
        if timed:
            self.bare_s[0] += w2 - w
            self.bare_s[1] += c2 - c
        self.mark = (w2, c2)


def dtrain_run(cfg: Any, warmup: int, steps: int, datamodule: Any = None,
               callbacks: tuple[L.Callback, ...] = (), checkpoint: bool = True) -> dict[str, float]:
    """The recipe's LightningModule under the Trainer of ``build_trainer``: steps per wall / CPU second, the peak
    device memory and the wall seconds of the whole fit. ``datamodule``: default the recipe's (``data``).
    ``checkpoint=False``: no ``last.ckpt`` at the end (after the timed steps; a large network's takes seconds)."""
    from dtrain.data import build_datamodule
    from dtrain.lit.common import module_class
    from dtrain.lit.fit import build_trainer, run_dir

    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    L.seed_everything(cfg.seed, verbose=False)
    start = time.perf_counter()
    datamodule = build_datamodule(cfg.data, seed=cfg.seed) if datamodule is None else datamodule
    module = module_class(cfg.method.name)(cfg)
    clock = StepClock(warmup, steps)
    trainer = build_trainer(cfg, run_dir(cfg), extra_callbacks=[*getattr(datamodule, "callbacks", list)(), clock,
                                                                   *callbacks])
    if not checkpoint:
        from lightning.pytorch.callbacks import ModelCheckpoint

        trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, ModelCheckpoint)]
    trainer.fit(module, datamodule=datamodule)
    return {"steps_per_s": steps / clock.seconds, "cpu_steps_per_s": steps / clock.cpu_seconds,
            "peak_mem_bytes": clock.peak_mem_bytes, "fit_wall_s": time.perf_counter() - start}


def reinsert_removed_costs() -> None:
    """``--before``: put back the per-step costs removed from dtrain's step in issue 14, to measure what they cost:
    the EMA's walk over the module tree on every update (now cached), ``torch.manual_seed`` on every step (it queries
    every accelerator backend; now the CPU and the device generator only) and ``self.log`` of the loss on every step
    (now accumulated on device and logged once per interval)."""
    from dtrain.lit import common
    from dtrain.models.ema import EMA

    EMA._lists = lambda self, net: (self.sources(net), {t: self.targets(self[t]) for t in self.rates})
    common.seed_generators = lambda seed, device: torch.manual_seed(seed)
    step = common.DiffusionModule.training_step

    def training_step(self: Any, batch: Any, batch_idx: int) -> Tensor:
        loss = step(self, batch, batch_idx)
        self.log("train/loss_step", loss.detach(), prog_bar=True, batch_size=len(batch["x"]))
        return loss

    common.DiffusionModule.training_step = training_step



def paired(rates: dict[str, list[float]], num: str, den: str) -> float:
    """The median of the per-repeat ratios num / den: the repeats are paired (interleaved in one process), so each
    ratio saw one machine load (every ratio in the results is this statistic)."""
    return statistics.median(n / d for n, d in zip(rates[num], rates[den]))

def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100, help="timed optimizer steps per repeat (each side)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before the clock starts")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--no-plain", action="store_true", help="skip the plain-Lightning reference")
    p.add_argument("--before", action="store_true", help="measure with the removed per-step costs put back")
    p.add_argument("overrides", nargs="*", help="recipe key=value overrides (both sides)")
    a = p.parse_args(argv)
    from dtrain.lit.fit import set_cpu_threads
    from dtrain.models import build_model, count_params

    set_cpu_threads(1)
    if a.before:
        reinsert_removed_costs()
    rates: dict[str, list[float]] = {k: [] for k in ("bare", "dtrain", "bare_cpu", "dtrain_cpu", "plain_bare",
                                                     "plain", "plain_bare_cpu", "plain_cpu")}
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = recipe(Path(tmp), a.batch_size, a.warmup + a.steps, a.overrides)
        for r in range(a.repeats):
            runs = [("dtrain", lambda cb: dtrain_run(cfg, a.warmup, a.steps, callbacks=cb))]
            if not a.no_plain:
                runs.append(("plain", lambda cb: plain_run(cfg, cb)))
            for name, fit_ in runs if r % 2 == 0 else runs[::-1]:
                inter = Interleaved(bare_loop(cfg, a.warmup + a.steps), a.warmup, a.steps)
                fit_((inter,))
                ref = "bare" if name == "dtrain" else "plain_bare"
                for side, (wall, cpu) in ((name, inter.dtrain), (ref, inter.bare_s)):
                    rates[side].append(a.steps / wall)
                    rates[f"{side}_cpu"].append(a.steps / cpu)
            print(f"repeat {r}: bare {rates['bare'][-1]:.2f} steps/s, dtrain {rates['dtrain'][-1]:.2f} steps/s, "
                  f"ratio {rates['dtrain'][-1] / rates['bare'][-1]:.3f} (CPU time: "
                  f"{rates['dtrain_cpu'][-1] / rates['bare_cpu'][-1]:.3f})"
                  + ("" if a.no_plain else
                     f"; plain Lightning / bare {rates['plain'][-1] / rates['plain_bare'][-1]:.3f}"),
                  flush=True)
    med = {k: statistics.median(v) for k, v in rates.items() if v}
    res = {
        "benchmark": "framework overhead: dtrain fit's Lightning loop vs a bare PyTorch loop, interleaved step by step",
        "command": "python benchmarks/overhead.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "recipe": str(RECIPE.relative_to(ROOT)), "overrides": a.overrides,
        "code": "with the per-step costs removed in issue 14 put back (--before)" if a.before else "as is",
        "model_params": count_params(build_model(cfg.model)),
        "batch_size": a.batch_size, "steps": a.steps, "warmup": a.warmup, "repeats": a.repeats,
        "bare_steps_per_s": med["bare"],
        "dtrain_steps_per_s": med["dtrain"],
        # the repeats are paired (interleaved in one process): the median of the per-repeat ratios is the estimate;
        # the ratio of the two medians mixes repeats that saw different machine load
        "ratio": paired(rates, "dtrain", "bare"),
        "ratio_of_medians": med["dtrain"] / med["bare"],
        "bare_ms_per_step": 1000 / med["bare"],
        "dtrain_ms_per_step": 1000 / med["dtrain"],
        "cpu_time": {"bare_steps_per_s": med["bare_cpu"], "dtrain_steps_per_s": med["dtrain_cpu"],
                     "ratio": paired(rates, "dtrain_cpu", "bare_cpu"),
                     "what": "steps per second of process CPU time (less sensitive to other processes)"},
        "plain_lightning": None if a.no_plain else {
            "ratio": paired(rates, "plain", "plain_bare"), "cpu_ratio": paired(rates, "plain_cpu", "plain_bare_cpu"),
            "what": "the bare step as a minimal LightningModule (no logger, callbacks, checkpoints, progress bar) "
                    "against the bare loop, interleaved the same way: the part of the gap that is Lightning's loop"},
        "all": rates,
        "machine": machine(),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "all"}, indent=1))
    return res


if __name__ == "__main__":
    main()
