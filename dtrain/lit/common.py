"""``DiffusionModule``: the training lifecycle every method shares; a method only supplies its loss.

Built from a resolved recipe: the network (``net``), its EMA copies (``ema``), the schedule and the
denoiser over them. The module owns the optimizer (AdamW or RAdam, linear warmup then constant or cosine LR),
gradient clipping (and the grad norm it measures), the EMA update (``EMAUpdate`` callback, before any
checkpoint of the same step), logging (the loss and its per-timestep-bucket means accumulated on device and
flushed with one host sync every ``trainer.log_every_n_steps``, so ``train/loss`` is the interval's mean; the grad
norm; the interval's throughput ``perf/*``), sampling with the shared samplers, and the format-1 checkpoint
metadata ``ckpt["dtrain"]``.

A subclass sets ``kind`` and implements ``compute_loss(batch) -> (loss [B], t [B] or None)``; it may add
``checkpoint_info()`` (method-specific metadata) and ``unsaved_prefixes`` (state-dict prefixes left out of
checkpoints, e.g. a frozen teacher).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from dtrain.config import RecipeError, key_source, recipe_hash, sample_shape, to_container
from dtrain.diffusion.denoiser import Denoiser
from dtrain.diffusion.guidance import CFGDenoiser
from dtrain.diffusion.schedule import SigmaSchedule, schedule_from_config
from dtrain.errors import InputError
from dtrain.export.checkpoint import (
    CKPT_FORMAT,
    CheckpointError,
    git_commit,
    model_differences,
    read_checkpoint,
    read_kind,
    read_model_section,
    read_schedule,
)
from dtrain.lit.guard import NonFiniteGuard
from dtrain.models import ADDED_EMBEDDINGS, DENOISER_FIELDS, TRAINING_ONLY, build_denoiser, build_model, count_params
from dtrain.models.ema import EMA
from dtrain.registry import Registry
from dtrain.samplers.base import derive_seed, initial_noise

__all__ = ["DiffusionModule", "LIT_MODULES", "module_class", "lr_factor", "time_fraction", "train_seed"]

# method name -> "module:Class" of its LightningModule, imported on use (students register theirs here).
LIT_MODULES: Registry[str] = Registry("method")
LIT_MODULES.register("denoising", "dtrain.lit.teacher:TeacherModule")
LIT_MODULES.register("pd", "dtrain.lit.progressive:ProgressiveModule")
LIT_MODULES.register("cd", "dtrain.lit.consistency:ConsistencyModule")
LIT_MODULES.register("ct", "dtrain.lit.consistency:ConsistencyModule")
LIT_MODULES.register("ict", "dtrain.lit.consistency:ConsistencyModule")
LIT_MODULES.register("meanflow", "dtrain.lit.flow_map:MeanFlowModule")
LIT_MODULES.register("ctm", "dtrain.lit.flow_map:CTMModule")


def module_class(method: str) -> type[DiffusionModule]:
    """The LightningModule class that trains ``method`` (``method.name`` of a recipe)."""
    import importlib

    mod, _, cls = LIT_MODULES.get(method, "method.name").partition(":")
    return getattr(importlib.import_module(mod), cls)


def _other_schedule(mine: dict[str, Any], theirs: dict[str, Any], teacher: Any) -> str | None:
    """Why a teacher on schedule ``theirs`` (``Schedule.to_dict``) cannot serve a student on ``mine``, or None."""
    if mine == theirs:
        return None
    return f"the student's schedule {mine} is not the teacher's {theirs} ({teacher}); set the student's schedule " \
           "section to the teacher's"


def _may_set(added: tuple[str, ...]) -> str:
    return f" (model.{', model.'.join(added)} may be set)" if added else ""


def say(trainer: Any, line: str) -> None:
    """Print ``line`` on rank 0 above the progress bar (``tqdm.write``); also once training has ended, where
    ``LightningModule.print`` goes to the closed bar and is lost (a PD run's last round, the final FID sweep)."""
    if trainer.is_global_zero:
        from tqdm import tqdm

        tqdm.write(line)


@contextlib.contextmanager
def on_root_device(trainer: Any, module: torch.nn.Module) -> Iterator[None]:
    """``module`` on the strategy's device for the block, then back: work at ``on_fit_end`` (a fit resumed from its
    last step's checkpoint runs it there) comes after the strategy's teardown took the module to the CPU."""
    device = next(module.parameters()).device
    module.to(trainer.strategy.root_device)
    try:
        yield
    finally:
        module.to(device)


def lr_factor(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """LR multiplier: linear warmup over ``warmup`` steps, then constant or cosine down to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))


def train_seed(seed: int, rank: int, step: int, micro: int = 0) -> int:
    """The seed of torch's global generators for micro-batch ``micro`` of optimizer step ``step`` on ``rank``
    (``DiffusionModule.training_step``): a resumed run draws exactly what the uninterrupted one drew."""
    return derive_seed(seed, rank, step, micro, 17)


def seed_generators(seed: int, device: torch.device) -> None:
    """``torch.manual_seed(seed)`` for the generators a training step draws from: the CPU's and, on a GPU, its
    device's (``torch.manual_seed`` also queries and seeds every accelerator backend: ~0.2 ms a call)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()
                                      ].manual_seed(seed)
    elif device.type != "cpu":
        torch.manual_seed(seed)


def time_fraction(schedule: Any, t: Tensor) -> Tensor:
    """Where t lies in the schedule's range, in [0, 1]: t / t_max, or log-sigma position for sigma schedules."""
    if isinstance(schedule, SigmaSchedule):
        return torch.log(t / schedule.t_min) / math.log(schedule.t_max / schedule.t_min)
    return t / schedule.t_max


class DiffusionModule(L.LightningModule):
    """Shared lifecycle; see the module docstring."""

    kind = "base"
    num_buckets = 10
    unsaved_prefixes: tuple[str, ...] = ()

    def __init__(self, recipe: Any, teacher: Any = None) -> None:
        super().__init__()
        self.recipe: dict[str, Any] = to_container(recipe) if isinstance(recipe, DictConfig) else dict(recipe)
        self._given_teacher = teacher  # a student's teacher given in code (tests), else the recipe's (``setup``)
        self.teacher: Any = None
        self.teacher_ref: dict[str, Any] | None = None
        r = self.recipe
        self.schedule = schedule_from_config(r["schedule"])
        self.net = build_model(r["model"])
        self.channels_last = bool(r["trainer"].get("channels_last", False)) and self.is_image
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        e = r.get("ema") or {}
        decays, stds = list(e.get("decays") or []), list(e.get("stds") or [])
        self.ema = EMA(self.net, decays, stds, e.get("start_step", 0), e.get("every", 1)) if decays or stds else None
        self._denoisers: dict[str | None, Denoiser] = {}  # plain dict: not registered, no duplicate state
        self._bucket: Tensor | None = None  # [2, num_buckets]: loss sums and counts, on device (not a buffer)
        self._grad_norm: Tensor | None = None
        self._loss_sum: Tensor | None = None  # sum of micro-batch losses since the last log, on device
        self._loss_n = 0
        self._logged_step = -1
        self._tick: tuple[float, int] | None = None  # (wall clock, global step) of the last throughput reading
        self._rng_micro = (-1, 0)  # (global step, micro-batches seen in it): the key of the per-step reseed
        t = r["trainer"]
        self.guard = NonFiniteGuard(int(t.get("max_bad_steps", 10)), bool(t.get("nan_guard", True)))
        self.class_names: list[str] | None = None  # the data's (a shard index's), set by ``dtrain fit``
        self.strict_loading = not self.unsaved_prefixes
        self.target: EMA | None = None  # theta^- of consistency-style targets (``make_target``)
        self._target_step = -1
        self.teacher_recipe: dict[str, Any] | None = None  # the teacher's training recipe (``frozen_teacher``)

    # ---- recipe views -------------------------------------------------------------------------------------
    @classmethod
    def teacher_needed(cls, recipe: Any) -> str:
        """Why training this recipe needs its ``teacher`` (a checkpoint or bundle), or "" when it does not: the method
        distils one (``distils``), or the student starts from its weights (``copies_teacher``). ``fit`` checks it
        before anything starts; a ``teacher`` object passed to the module stands in for it."""
        name = recipe["method"]["name"]
        if cls.distils(recipe):
            return f"method {name!r} distils a teacher"
        if cls.copies_teacher(recipe) is not None:
            return f"method.init teacher starts method {name!r} from a teacher's weights (or use method.init: scratch)"
        return ""

    @classmethod
    def distils(cls, recipe: Any) -> bool:
        """Whether the method's loss reads a teacher."""
        return False

    @classmethod
    def target_ema(cls, recipe: Any) -> float:
        """The decay of the target network theta^- a recipe trains with (``make_target``; 0: none)."""
        return 0.0

    @classmethod
    def check_resume(cls, path: Path, ckpt: Mapping[str, Any], recipe: Mapping[str, Any], run: Path) -> None:
        """A method's own checks of the checkpoint ``path`` a fit resumes from, before the trainer starts
        (``dtrain.lit.checkpointing.resume_path``, after its ``check_resume``); ``CheckpointError``. Here theta^-'s
        decay: its copy in the checkpoint is named by it, and another one left that copy unread and restarted theta^-
        from the first weights."""
        before = (ckpt.get("dtrain") or {}).get("recipe")
        if isinstance(before, Mapping) and (was := cls.target_ema(before)) != (now := cls.target_ema(recipe)):
            raise CheckpointError(path, "method.target_ema", f"{was} in the checkpoint (now {now}): its target "
                                  f"network theta^- was trained with that decay; resume with it, or start a new run")

    @classmethod
    def teacher_target(cls, recipe: Any) -> bool:
        """Whether a teacher sets the training target (a resume must keep the same one): ``distils``."""
        return cls.distils(recipe)

    @classmethod
    def copies_teacher(cls, recipe: Any) -> tuple[str, ...] | None:
        """None when the student does not start from its teacher's network; else the ``model`` keys the student may
        turn on that the teacher lacks (a zero-initialised embedding: ``second_time``, ``w_cond``)."""
        return None

    @classmethod
    def reads_teacher(cls, recipe: Any) -> bool:
        """Whether a ``teacher`` the recipe gives is used at all (``teacher_needed``; a flow-map student also takes
        an optional one as its target); ``fit`` refuses one that would be ignored."""
        return bool(cls.teacher_needed(recipe))

    @classmethod
    def teacher_on_my_schedule(cls, recipe: Any) -> bool:
        """Whether the teacher must have been trained on the student's schedule (else it is rescheduled)."""
        return True

    @classmethod
    def check_teacher_network(cls, recipe: Any, source: str = "recipe", overrides: Any = ()) -> None:
        """Before a run starts: a student that starts from its teacher's weights (``copies_teacher``) has the network
        its ``teacher`` file records (the ``model`` section of the teacher's metadata; no weights are read), else
        ``RecipeError`` naming the keys that differ. The denoiser's fields (``param`` ...) and the training-only
        keys (``dropout``, ``grad_checkpoint``) may differ; a sharded checkpoint directory's metadata is read without
        consolidating it. A method that distils its teacher needs a denoiser (a teacher's or a
        PD student's file), not a few-step student."""
        teacher = recipe.get("teacher")
        if cls.distils(recipe) and teacher is not None and Path(teacher).exists():
            kind = read_kind(teacher)
            if kind is not None and kind not in ("denoiser", "guided_denoiser"):
                raise RecipeError(source, "teacher", f"{teacher} holds a {kind!r} student, not a denoiser: method "
                                  f"{recipe['method']['name']!r} distils a teacher's (or a PD student's) checkpoint "
                                  f"or bundle")
        added = cls.copies_teacher(recipe)
        if added is None or teacher is None or not Path(teacher).exists():
            return  # a missing file is named by the recipe checks
        theirs = read_model_section(teacher)
        mine = to_container(recipe["model"]) if isinstance(recipe["model"], DictConfig) else dict(recipe["model"])
        skip = {*DENOISER_FIELDS, *TRAINING_ONLY} - {"name"}
        diff = [k for k in model_differences(theirs, mine, skip) if not (k in added and mine[k])]
        if diff:
            raise RecipeError(key_source("model", source, overrides), "model", f"the student network is not the "
                              f"teacher's ({teacher}): "
                              + ", ".join(f"model.{k} {mine[k]!r} (the teacher's {theirs[k]!r})" for k in diff)
                              + f"; copy the teacher's model section{_may_set(added)}, or use another teacher")

    @classmethod
    def check_teacher_schedule(cls, recipe: Any, source: str = "recipe", overrides: Any = ()) -> None:
        """Before a run starts: a teacher that must run on the student's schedule (``teacher_on_my_schedule``) was
        trained on it, read from its metadata (else ``RecipeError`` naming ``schedule``); setup checks it again."""
        teacher = recipe.get("teacher")
        if teacher is None or not Path(teacher).exists() or not cls.teacher_needed(recipe) \
                or not cls.teacher_on_my_schedule(recipe):
            return
        theirs = read_schedule(teacher)
        if (why := _other_schedule(schedule_from_config(recipe["schedule"]).to_dict(), theirs, teacher)) is not None:
            raise RecipeError(key_source("schedule", source, overrides), "schedule", why)

    @property
    def num_classes(self) -> int:
        return int(self.recipe["model"].get("num_classes", 0) or 0)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return sample_shape(self.recipe["model"])

    @property
    def is_image(self) -> bool:
        return len(self.sample_shape) == 3

    def ema_step(self, step: int) -> int:
        """The step the EMA schedule counts (``ema.start_step``, ``ema.every``, the power-function profile) after
        optimizer step ``step``: the global step here; progressive distillation counts from its round's start."""
        return step

    @property
    def ema_tags(self) -> list[str]:
        return self.ema.tags if self.ema is not None else []

    @property
    def default_ema(self) -> str | None:
        """The EMA copy used for samples (the first listed), or None for the raw network."""
        return self.ema_tags[0] if self.ema_tags else None

    # ---- denoisers and sampling ---------------------------------------------------------------------------
    def denoiser_for(self, ema: str | None = None) -> Denoiser:
        """The denoiser over the raw network (None) or the EMA copy with that tag."""
        if ema not in self._denoisers:
            net = self.net if ema is None else self.ema[ema]  # type: ignore[index]
            self._denoisers[ema] = build_denoiser(self.recipe["model"], self.schedule, net=net)
        return self._denoisers[ema]

    @property
    def denoiser(self) -> Denoiser:
        """The denoiser being trained (over ``net``)."""
        return self.denoiser_for(None)

    def guided(self, den: Any, w: float) -> Any:
        """``den`` at guidance scale w: classifier-free guidance (students that take w as an input override this)."""
        return CFGDenoiser(den, w, self.num_classes)

    def sample_grids(self) -> dict[tuple[str, int], Tensor]:
        """Time grids of (sampler, NFE) points that are not the sampler's default (a PD student's distilled ones),
        for sampling and the eval sweep."""
        return {}

    @torch.no_grad()
    def sample(
        self,
        n: int | None = None,
        *,
        labels: Tensor | None = None,
        nfe: int | None = None,
        guidance: float | None = None,
        ema: str | None = "default",
        sampler: str | None = None,
        generator: torch.Generator | None = None,
        grid: Tensor | None = None,
    ) -> Tensor:
        """Samples from the recipe's sampler (``sampler`` section), optionally class-conditional with CFG; ``grid``:
        the time grid (else ``sample_grids``' for the sampler and NFE, else the sampler's default one)."""
        from dtrain.samplers import run

        s = self.recipe.get("sampler") or {}
        n = len(labels) if labels is not None else int(n or 16)
        ema = self.default_ema if ema == "default" else ema
        den: Any = self.denoiser_for(ema)
        w = float(s.get("guidance", 1.0) if guidance is None else guidance)
        cond = labels.to(self.device) if labels is not None and self.num_classes > 0 else None
        if cond is not None and w != 1.0:
            den = self.guided(den, w)
        x_T = initial_noise(den.schedule, n, self.sample_shape, generator, self.device)  # the schedule sampled on
        opts = {"eta": s["eta"]} if s.get("eta") is not None else {}
        was_training = self.net.training
        self.net.eval()
        try:
            name, nfe = sampler or s.get("name", "ddim"), int(nfe or s.get("nfe", 50))
            grid = grid if grid is not None else self.sample_grids().get((name, nfe))
            return run(name, den, x_T, nfe, cond=cond, generator=generator, spacing=s.get("spacing"), grid=grid,
                       **opts)
        finally:
            self.net.train(was_training)

    # ---- training -----------------------------------------------------------------------------------------
    def compute_loss(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """Per-sample loss [B] and the times [B] it was taken at (or None)."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.recipe["trainer"].get("compile", False):
            st = self.recipe.get("strategy") or {}
            if st.get("name") == "deepspeed" and int(st.get("zero_stage", 0)) == 3:
                warnings.warn("trainer.compile under ZeRO-3: DeepSpeed's parameter hooks make torch.compile "
                              "recompile until it falls back to eager (measured: recompile_limit hit on CPU); expect "
                              "little speed-up, or use zero_stage 2 / fsdp2", stacklevel=2)
            self.net.compile()

    def configure_model(self) -> None:
        """fsdp2 shards ``net`` and its EMA copies alike here; other strategies: nothing (``dtrain.dist.strategy``)."""
        from dtrain.dist.strategy import configure_model

        configure_model(self)

    def configure_callbacks(self) -> list[L.Callback]:
        from dtrain.lit.callbacks import EMAUpdate

        return [EMAUpdate()] if self.ema is not None else []

    def on_train_start(self) -> None:
        self._tick = (time.perf_counter(), self.global_step)
        # under gradient accumulation the first micro-batch ends at the start step: no interval to log yet
        self._logged_step = self.global_step
        for config in self.trainer.lr_scheduler_configs:  # a resume restores the LR the old schedule set for this
            s = config.scheduler  # step: set the one this run's schedule (e.g. a longer max_steps) gives it
            if isinstance(s, torch.optim.lr_scheduler.LambdaLR):
                for group, base, fn in zip(s.optimizer.param_groups, s.base_lrs, s.lr_lambdas, strict=True):
                    group["lr"] = base * fn(s.last_epoch)
        # distinct noise on every rank; replayable from (seed, rank, step) after a resume
        seed = int(self.recipe.get("seed", 0))
        L.seed_everything((seed + 7919 * self.global_rank + 104729 * self.global_step) % 2**32, verbose=False)
        for m in self.modules():  # tensors may have been replaced since the last fit (device, strategy, restore)
            if isinstance(m, EMA):
                m.reset_cache()
                if any(t.dtype in (torch.float16, torch.bfloat16) for t in m.parameters()):
                    m.float()  # trainer.precision 16-true / bf16-true casts the module: averages need float32

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        # torch's global RNG (noise, times and dropout drawn without an explicit generator) as a pure function of
        # (seed, rank, step, micro-batch): a run resumed from any checkpoint draws what the uninterrupted one drew
        step = self.global_step
        self._rng_micro = (step, self._rng_micro[1] + 1 if self._rng_micro[0] == step else 0)
        seed_generators(train_seed(int(self.recipe.get("seed", 0)), self.global_rank, step, self._rng_micro[1]),
                        batch["x"].device)  # where the step draws (under FSDP1 self.device can still say cpu)
        if batch["x"].dtype in (torch.float16, torch.bfloat16):  # bf16-true, 16-true, DeepSpeed bf16 cast the batch:
            batch = {**batch, "x": batch["x"].float()}  # the loss's arithmetic (PD's x0~, CT's 1 / ds-weighted
            # differences) in float32; each network still gets its own dtype (as_net_input)
        if self.channels_last and batch["x"].ndim == 4:
            batch = {**batch, "x": batch["x"].contiguous(memory_format=torch.channels_last)}
        loss_b, t = self.compute_loss(batch)
        self.guard.observe(loss_b)
        loss = loss_b.mean()
        if self._loss_sum is None or self._loss_sum.device != loss.device:
            self._loss_sum, self._loss_n = torch.zeros((), dtype=torch.float64, device=loss.device), 0
        self._loss_sum.add_(loss.detach())  # logged as the mean of the interval (on_train_batch_end): no per-step log
        self._loss_n += 1
        if t is not None:
            self._accumulate(loss_b.detach(), t.detach())
        return loss

    def make_target(self, mu: float) -> None:
        """The target network theta^- of consistency-style losses (CD / CT, CTM): with ``mu`` > 0 an EMA copy
        ``target.<tag>.*`` of ``net`` in the checkpoint, updated at the start of each optimizer step with the current
        weights (so a checkpoint taken after step k resumes exactly); with 0 the student itself without gradient."""
        self.target = EMA(self.net, [mu]) if mu > 0 else None

    def target_decay(self, step: int) -> float | None:
        """theta^-'s decay at training step ``step``, where a method schedules it (None: ``make_target``'s mu)."""
        return None

    @property
    def target_net(self) -> torch.nn.Module:
        """theta^-: the target's EMA copy, or ``net`` (read it without gradient)."""
        return self.net if self.target is None else self.target[self.target.tags[0]]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # theta^- <- EMA with the weights of this step, before the loss; not after a step the non-finite guard
        # dropped: the weights did not move (the guard's state is checkpointed)
        if self.target is not None and self.global_step != self._target_step:
            self._target_step = self.global_step
            if self.global_step == 0 or self.guard.in_a_row == 0:
                self.target.update(self.net, self.global_step, beta=self.target_decay(self.global_step))

    def step_generator(self) -> torch.Generator:
        """A CPU generator for this micro-batch's draws (students' noise, times, labels), seeded by (seed, rank,
        global step, micro-batch): independent of torch's global RNG, and replayed exactly after a resume."""
        step, micro = self._rng_micro
        micro = micro if step == self.global_step else 0  # compute_loss called outside training_step
        return torch.Generator().manual_seed(derive_seed(int(self.recipe.get("seed", 0)), self.global_rank,
                                                         self.global_step, micro))

    def _accumulate(self, loss_b: Tensor, t: Tensor) -> None:
        if self._bucket is None or self._bucket.device != loss_b.device:
            self._bucket = torch.zeros(2, self.num_buckets, dtype=torch.float64, device=loss_b.device)
        idx = (time_fraction(self.schedule, t) * self.num_buckets).long().clamp_(0, self.num_buckets - 1)
        self._bucket[0].index_add_(0, idx, loss_b.to(torch.float64))
        self._bucket[1].index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.global_step
        # a stop (a signal's checkpoint: dtrain.dist.slurm.Preemption) makes Lightning write the logged values at
        # this step too (its should_update_logs): fresh ones, not the last interval's again
        stopping = bool(self.trainer.should_stop)
        if step == self._logged_step or (step % self.trainer.log_every_n_steps and step != self.trainer.max_steps
                                         and not stopping):
            return
        self._logged_step = step
        logs: dict[str, Any] = {}
        if (engine := getattr(self.trainer.strategy, "deepspeed_engine", None)) is not None:
            self._grad_norm = engine.get_global_grad_norm()  # the norm DeepSpeed clipped by (None: not computed)
        if self._grad_norm is not None:
            logs["train/grad_norm"] = self._grad_norm
        if self.guard.enabled:
            logs["train/bad_steps"] = float(self.guard.total)
        logs.update(self._throughput(step))
        logs.update(self.step_logs(max(0, step - 1)))  # what the batch just trained (Lightning's x-axis)
        buckets = self._bucket is not None and step > 0
        loss = None
        if step > 0 and (self._loss_n or buckets):
            parts = [self._loss_sum.reshape(1)] if self._loss_n else []  # type: ignore[union-attr]
            vec = torch.cat([*parts, *([self._bucket.flatten()] if buckets else [])])
            world = self.trainer.world_size
            if world > 1:  # the mean over all ranks (every rank logs at the same steps): one collective an interval
                vec = self.trainer.strategy.reduce(vec, reduce_op="sum")
            vals = vec.tolist()  # the one host sync
            if self._loss_n:
                loss = vals.pop(0) / (self._loss_n * world)
                self._loss_sum.zero_()  # type: ignore[union-attr]
                self._loss_n = 0
            if buckets:
                nb = self.num_buckets
                sums, counts = vals[:nb], vals[nb:]
                logs.update({f"loss_t/{i / nb:.1f}": s / c for i, (s, c) in enumerate(zip(sums, counts)) if c > 0})
                self._bucket.zero_()  # type: ignore[union-attr]
        if step % self.trainer.log_every_n_steps and not stopping:  # the last, partial interval: Lightning writes
            if self.trainer.is_global_zero:  # on its interval only, so they go to the loggers here (its x-axis)
                metrics = {k: float(v) for k, v in logs.items()} | ({"train/loss": loss} if loss is not None else {})
                for lg in self.trainer.loggers:
                    lg.log_metrics(metrics, step=step - 1)
            return
        if loss is not None:
            self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        if logs:
            self.log_dict(logs, on_step=True, on_epoch=False)

    def step_logs(self, step: int) -> dict[str, float]:
        """A method's own numbers for the batch of training step ``step`` (host values, no sync), e.g. the state of
        a curriculum."""
        return {}

    def _throughput(self, step: int) -> dict[str, float]:
        """``perf/*`` since the last reading (wall clock, checkpoints and sample grids of the interval included; no
        host sync): optimizer steps and samples (over all ranks) per second, and on CUDA this rank's peak allocated
        memory so far (the peak is not reset: benchmarks and GPU tests read it after the fit)."""
        now, tick = time.perf_counter(), self._tick
        self._tick = (now, step)
        if tick is None or step <= tick[1] or now <= tick[0]:
            return {}
        t = self.trainer
        steps_per_s = (step - tick[1]) / (now - tick[0])
        batch = int(self.recipe["data"]["batch_size"]) * t.world_size * t.accumulate_grad_batches
        out = {"perf/steps_per_s": steps_per_s, "perf/samples_per_s": steps_per_s * batch}
        if (dev := t.strategy.root_device).type == "cuda":  # the module's device may read cpu under FSDP1
            out["perf/max_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        return out

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by global norm and keep the norm (a device tensor) for logging; other strategies: Lightning's.

        Runs after the backward, before the optimizer step: the non-finite guard (``dtrain.lit.guard``) judges
        the step here and drops the gradients of a bad one."""
        from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

        if isinstance(self.trainer.strategy, DeepSpeedStrategy):  # a DDPStrategy, but the engine owns the gradients:
            # it clips them (config gradient_clipping); the guard judges the loss only, once per optimizer step
            # (Lightning calls this after every micro-batch under DeepSpeed; the engine steps on its boundary)
            engine = self.trainer.strategy.deepspeed_engine
            if engine is None or engine.is_gradient_accumulation_boundary():
                self._guard_step([], None, dropped=False)
            return
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not isinstance(self.trainer.strategy, SingleDeviceStrategy | DDPStrategy):
            norm = _local_grad_norm(params) if self.guard.enabled and params else None
            self._guard_step(params, norm)
            if not self.guard.skipped:
                super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        if gradient_clip_val:
            self._grad_norm = torch.nn.utils.clip_grad_norm_(params, gradient_clip_val, foreach=True)
        else:
            self._grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
            if (scale := _pending_scale(self.trainer.precision_plugin, optimizer)) is not None:
                self._grad_norm = self._grad_norm / scale
        self._guard_step(params, self._grad_norm)

    def _guard_step(self, params: list[torch.nn.Parameter], grad_norm: Tensor | None, dropped: bool = True) -> None:
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)  # 16-mixed: the scaler skips bad grads
        if self.guard.check(grad_norm, world_size=self.trainer.world_size, judge_grads=scaler is None):
            return
        if scaler is None:
            for p in params:
                p.grad = None  # AdamW skips parameters without a gradient: no update, moments and step untouched
        if self.trainer.is_global_zero or self.guard.in_a_row >= self.guard.max_bad:
            self.guard.report(self.global_step, dropped=dropped)

    def lr_lambda(self) -> Any:
        """The LR multiplier as a function of the optimizer step (students with rounds override this)."""
        o = self.recipe["optim"]
        return partial(lr_factor, warmup=int(o["warmup_steps"]), total=int(self.recipe["trainer"]["max_steps"]),
                       schedule=o["lr_schedule"], min_ratio=float(o["min_lr_ratio"]))

    def configure_optimizers(self) -> Any:
        o = self.recipe["optim"]
        impl = o.get("impl", "auto")
        if impl == "auto":  # fused: on CUDA, where clipping can run with it (``fused_clip_conflict``)
            from dtrain.dist.strategy import fused_clip_conflict

            t = self.recipe["trainer"]
            conflict = fused_clip_conflict(self.recipe.get("strategy", {}).get("name", "auto"), t["precision"],
                                           float(o["grad_clip"] or 0))
            impl = "fused" if self.device.type == "cuda" and not conflict else "foreach"
        name = o.get("name", "adamw")
        if name == "radam" and impl == "fused":  # auto on CUDA (the recipe check refuses an explicit fused RAdam)
            impl = "foreach"
        kw = {"fused": {"fused": True}, "foreach": {"foreach": True}, "plain": {"foreach": False}}[impl]
        hp = dict(lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"], weight_decay=o["weight_decay"], **kw)
        if name == "radam":  # RAdam (arXiv 1908.03265), CM's and iCT's; weight decay decoupled as AdamW's
            opt = torch.optim.RAdam(self.net.parameters(), decoupled_weight_decay=True, **hp)
        else:
            opt = torch.optim.AdamW(self.net.parameters(), **hp)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_lambda())
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- checkpoints --------------------------------------------------------------------------------------
    def frozen_teacher(self, source: Any, *, ema: Any = "auto", same_schedule: bool = True, init_from: bool = True
                       ) -> tuple[Any, dict[str, Any]]:
        """The frozen teacher and its reference (kept in checkpoints as provenance): ``source`` is a denoiser object
        (tests) or a checkpoint / bundle path (``dtrain.export.checkpoint.load_teacher``). ``same_schedule``: the
        student learns the teacher's ODE in its own time, so the schedules must be equal. With ``init_from`` (the
        student starts from the teacher's weights), a teacher predicting another parameterization warns.

        The teacher builds targets with its raw x0, without ``model.clip_x0``, unless ``method.teacher_clip``: the
        student is trained on its raw output and clips only when it samples. Clipped targets pile up on the clip
        bound where the teacher overshot it; the student's raw output then scatters around the bound, clipping
        keeps only the inner half, and the samples lose contrast (digits PD, 64 -> 32 steps: FID-digits 0.308
        with clipped targets, 0.227 without, the teacher's own DDIM-32 0.217)."""
        from dtrain.export.checkpoint import load_teacher

        self.teacher_recipe = None  # known when a file gave the teacher
        if isinstance(source, (str, Path)):
            teacher, info = load_teacher(source, ema=ema, field="method.teacher_ema")
            ref, self.teacher_recipe = info["ref"], (info.get("provenance") or {}).get("recipe")
            mine, theirs = self.recipe["model"].get("param"), info["model"].get("param")
            if init_from and mine != theirs:
                hint = (" (the eps teacher's targets use its x0 = (x_t - sigma eps) / alpha, clipped only with "
                        "method.teacher_clip; give the student more steps at first, as it re-learns its output head)"
                        if theirs == "eps" else "")
                warnings.warn(f"model.param: the student predicts {mine!r}, the teacher {theirs!r}; the student "
                              f"starts from the teacher's weights read as {mine!r}{hint}", stacklevel=3)
        else:
            teacher, ref = source, {"path": None, "format": "object", "kind": type(source).__name__}
        if getattr(teacher, "clip_x0", None) is not None and not self.recipe["method"].get("teacher_clip", False):
            teacher = copy.copy(teacher)  # an object passed in keeps its own setting
            teacher.clip_x0 = None
        why = _other_schedule(self.schedule.to_dict(), teacher.schedule.to_dict(), ref.get("path"))
        if same_schedule and why is not None:
            raise InputError(f"schedule: {why}")
        return teacher.requires_grad_(False).eval().to(self.device), ref

    def teacher_source(self, given: Any = None) -> Any:
        """The teacher to load: ``given`` (an object passed to the module), else the recipe's ``teacher``; None when
        there is none and the recipe needs none, else ``InputError`` naming the field and why (``teacher_needed``)."""
        source = given if given is not None else self.recipe.get("teacher")
        if source is None and (why := self.teacher_needed(self.recipe)):
            raise InputError(f"teacher: {why}; give a checkpoint or bundle path")
        return source

    def init_from_teacher(self, teacher: Any, *, keep_own: bool = False) -> None:
        """net, its EMA copies and the target network <- the teacher's network; the embeddings of the ``model`` keys
        ``copies_teacher`` names, which the teacher lacks, stay at their zero initialisation. A teacher without a
        network (an object passed in): ``InputError``, or with ``keep_own`` a warning and the student's own weights."""
        added = self.copies_teacher(self.recipe) or ()
        net, where = getattr(teacher, "net", None), (self.teacher_ref or {}).get("path")
        if net is None and not keep_own:
            raise InputError(f"method.init: the teacher ({type(teacher).__name__}) has no network to copy; "
                             f"use method.init: scratch")
        if net is None:
            warnings.warn("teacher: it has no network to copy; the student starts from its own initialisation",
                          stacklevel=2)
        else:
            bad, fix = f"model: the student network is not the teacher's ({where})", \
                f"copy the teacher's model section{_may_set(added)}"
            try:
                missing, unexpected = self.net.load_state_dict(net.state_dict(), strict=False)
            except RuntimeError as e:  # a tensor of another shape
                raise InputError(f"{bad}: {str(e).splitlines()[-1].strip().rstrip('.')}; {fix}") from None
            new = tuple(ADDED_EMBEDDINGS[k] for k in added)
            missing = [k for k in missing if not k.startswith(new)]
            if missing or unexpected:
                raise InputError(f"{bad}: missing {missing[:5]}, unexpected {unexpected[:5]}; {fix}")
        for ema in (self.ema, self.target):
            for tag in ema.tags if ema is not None else []:
                ema[tag].load_state_dict(self.net.state_dict())

    def checkpoint_info(self) -> dict[str, Any]:
        """Method-specific entries for ``ckpt["dtrain"]`` (subclasses add theirs)."""
        return {}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nan_guard"] = self.guard.state_dict()
        sd = checkpoint["state_dict"]
        for k in [k for k in sd if k.startswith(self.unsaved_prefixes)] if self.unsaved_prefixes else []:
            del sd[k]
        checkpoint["dtrain"] = {
            "format": CKPT_FORMAT,
            "recipe": self.recipe,
            "recipe_hash": recipe_hash(OmegaConf.create(self.recipe)),
            "git_commit": git_commit(),
            "ema_tags": self.ema_tags,
            "default_ema": self.default_ema,
            "kind": self.kind,
            "image": {"shape": list(self.sample_shape), "range": [-1.0, 1.0] if self.is_image else None},
            **({"class_names": self.class_names} if self.class_names else {}),  # bundles: labels by name
            **self.checkpoint_info(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.guard.load_state_dict(checkpoint.get("nan_guard") or {})

    @classmethod
    def load_checkpoint(cls, path: str | Path) -> DiffusionModule:
        """Rebuild a module (on the CPU) from a format-1 checkpoint, read with ``weights_only=True``."""
        ckpt = read_checkpoint(path)
        recipe = ckpt["dtrain"]["recipe"]
        klass = module_class(recipe["method"]["name"]) if cls is DiffusionModule else cls
        module = klass(recipe)
        module.load_state_dict(ckpt["state_dict"], strict=module.strict_loading)
        module.on_load_checkpoint(ckpt)  # what a method keeps beside the weights (PD: the round it reached)
        return module

    def num_params(self) -> int:
        return count_params(self.net)


def _pending_scale(precision: Any, optimizer: torch.optim.Optimizer) -> Tensor | float | None:
    """The loss scale the gradients still carry here, or None: under 16-mixed Lightning unscales them before the
    clipping hook unless the optimizer unscales inside its own step (fused AdamW), whose gradients are scaled."""
    scaler = getattr(precision, "scaler", None)
    if scaler is None or not getattr(optimizer, "_step_supports_amp_scaling", False):
        return None
    scale = getattr(scaler, "_scale", None)  # the device tensor (no host sync); get_scale() reads it to the host
    return scale if isinstance(scale, Tensor) else scaler.get_scale()


def _local_grad_norm(params: list[torch.nn.Parameter]) -> Tensor:
    """Norm of this rank's gradient pieces (sharded strategies: DTensor grads read locally); finite iff they are."""
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in (p.grad for p in params)]
    return torch.nn.utils.get_total_norm(grads, foreach=True)
