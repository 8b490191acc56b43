"""Framework overhead: dtrain's training loop against a bare PyTorch loop on the same work.

    python benchmarks/overhead.py [--steps 60] [--warmup 10] [--repeats 5] [--batch-size 8] [key=value ...]
        # -> benchmarks/results/overhead.json

Both sides train the digits teacher (``recipes/teacher/digits.yaml``, any ``key=value`` override applies) on the
same in-memory digits, batch, UNet, AdamW (the recipe's ``optim``: foreach on CPU), LR warmup, global-norm
gradient clipping and EMA copies (the recipe's ``ema``, averaged with ``torch._foreach_lerp_``):

- **bare**: one hand-written loop: gather a batch, draw t and noise, v-prediction MSE, backward, clip, step,
  LR schedule, EMA. Nothing else: no logging, no callbacks, no loss bookkeeping.
- **dtrain**: the LightningModule of ``dtrain fit`` (``module_class``) under the Trainer that
  ``dtrain.lit.fit.build_trainer`` builds from the recipe (CSV logger, progress bar and logging intervals as the
  recipe sets them; periodic checkpoints and sample grids off, they are not per-step work).

Each side runs ``warmup + steps`` optimizer steps; the clock covers the last ``steps`` (from the end of step
``warmup`` to the end of the last step, so data loading is inside), start-up and the final checkpoint are not.
Repeats alternate bare / dtrain (the order flips every repeat), on one torch thread; the machine may be shared,
so the report gives the median of each side, the ratio of the medians and the median of the per-pair ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch

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
def bare_run(cfg: Any, warmup: int, steps: int) -> float:
    """Steps per second of a plain PyTorch loop doing the recipe's training step (v-prediction, DDPM schedule)."""
    from dtrain.data.memory import digits_arrays
    from dtrain.diffusion.schedule import schedule_from_config
    from dtrain.lit.common import lr_factor
    from dtrain.models import build_model
    from dtrain.models.ema import power_beta, std_to_gamma

    torch.manual_seed(cfg.seed)
    if cfg.model.param != "v" or cfg.schedule.name not in ("ddpm", "vp_discrete"):
        raise SystemExit("overhead.py: the bare loop implements v-prediction on a discrete VP schedule only")
    x_all, y_all = digits_arrays(cfg.data.split)
    net = build_model(cfg.model).train()
    emas = [(build_model(cfg.model).requires_grad_(False).eval(), ("decay", d)) for d in cfg.ema.decays]
    emas += [(build_model(cfg.model).requires_grad_(False).eval(), ("power", std_to_gamma(s))) for s in cfg.ema.stds]
    for e, _ in emas:
        e.load_state_dict(net.state_dict())
    src = [p for p in net.parameters()]
    dst = [[p for p in e.parameters()] for e, _ in emas]
    o = cfg.optim
    opt = torch.optim.AdamW(net.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                            foreach=True)
    total = warmup + steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(
        s, warmup=o.warmup_steps, total=total, schedule=o.lr_schedule, min_ratio=o.min_lr_ratio))
    ac = schedule_from_config(cfg.schedule).alphas_cumprod.float()  # [T]
    a_tab, s_tab = ac.sqrt(), (1 - ac).sqrt()
    T, B, K, p_drop = len(ac), cfg.data.batch_size, cfg.model.num_classes, cfg.method.cfg_dropout
    perm, pos = torch.randperm(len(x_all)), 0
    t0 = 0.0
    for step in range(1, total + 1):
        if pos + B > len(perm):
            perm, pos = torch.randperm(len(x_all)), 0
        idx = perm[pos : pos + B]
        pos += B
        x0, y = x_all[idx], y_all[idx]
        y = torch.where(torch.rand(B) < p_drop, torch.full_like(y, K), y)
        i = torch.randint(0, T, (B,))
        a, s = a_tab[i].view(B, 1, 1, 1), s_tab[i].view(B, 1, 1, 1)
        eps = torch.randn_like(x0)
        v_hat = net(a * x0 + s * eps, i.float(), y)
        loss = (v_hat - (a * eps - s * x0)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(src, o.grad_clip, foreach=True)
        opt.step()
        sched.step()
        with torch.no_grad():
            for d, (_, (kind, v)) in zip(dst, emas):
                b = power_beta(v, step) if kind == "power" else v
                torch._foreach_lerp_(d, src, 1.0 - b)
        if step == warmup:
            t0 = time.perf_counter()
    return steps / (time.perf_counter() - t0)


# ---- (b) dtrain's Lightning path ----------------------------------------------------------------------------
class StepClock(L.Callback):
    """Wall time from the end of batch ``warmup - 1`` to the end of batch ``warmup + steps - 1``."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps, self.t0, self.seconds = warmup, steps, 0.0, float("nan")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.warmup - 1:
            self.t0 = time.perf_counter()
        elif batch_idx == self.warmup + self.steps - 1:
            self.seconds = time.perf_counter() - self.t0


def dtrain_run(cfg: Any, warmup: int, steps: int) -> tuple[float, float]:
    """(steps per second, wall seconds of the whole fit) through ``build_trainer`` and the recipe's module."""
    from dtrain.data import build_datamodule
    from dtrain.lit.common import module_class
    from dtrain.lit.fit import build_trainer, run_dir

    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    L.seed_everything(cfg.seed, verbose=False)
    start = time.perf_counter()
    datamodule = build_datamodule(cfg.data, seed=cfg.seed)
    module = module_class(cfg.method.name)(cfg)
    clock = StepClock(warmup, steps)
    trainer = build_trainer(cfg, run_dir(cfg), extra_callbacks=[*getattr(datamodule, "callbacks", list)(), clock])
    trainer.fit(module, datamodule=datamodule)
    return steps / clock.seconds, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60, help="timed optimizer steps per repeat")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before the clock starts")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("overrides", nargs="*", help="recipe key=value overrides (both sides)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    bare, dtr, walls = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = recipe(Path(tmp), a.batch_size, a.warmup + a.steps, a.overrides)
        for r in range(a.repeats):
            for side in (("bare", "dtrain") if r % 2 == 0 else ("dtrain", "bare")):
                if side == "bare":
                    bare.append(bare_run(cfg, a.warmup, a.steps))
                else:
                    rate, wall = dtrain_run(cfg, a.warmup, a.steps)
                    dtr.append(rate)
                    walls.append(wall)
            print(f"repeat {r}: bare {bare[-1]:.2f} steps/s, dtrain {dtr[-1]:.2f} steps/s, "
                  f"ratio {dtr[-1] / bare[-1]:.3f}", flush=True)
    res = {
        "benchmark": "framework overhead: dtrain fit's Lightning loop vs a bare PyTorch loop",
        "command": "python benchmarks/overhead.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "recipe": str(RECIPE.relative_to(ROOT)),
        "model_params": sum(p.numel() for p in __import__("dtrain.models", fromlist=["build_model"])
                            .build_model(cfg.model).parameters()),
        "batch_size": a.batch_size, "steps": a.steps, "warmup": a.warmup, "repeats": a.repeats,
        "bare_steps_per_s": statistics.median(bare),
        "dtrain_steps_per_s": statistics.median(dtr),
        "ratio": statistics.median(dtr) / statistics.median(bare),
        "paired_ratio_median": statistics.median(d / b for d, b in zip(dtr, bare)),
        "bare_ms_per_step": 1000 / statistics.median(bare),
        "dtrain_ms_per_step": 1000 / statistics.median(dtr),
        "bare_all": bare, "dtrain_all": dtr,
        "dtrain_fit_wall_s_median": statistics.median(walls),
        "machine": machine(),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if not k.endswith("_all")}, indent=1))
    return res


if __name__ == "__main__":
    main()
