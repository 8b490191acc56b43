"""Consistency models in ``dtrain fit``: CD, CT and iCT (``method.name``: cd | ct | ict; arXiv 2303.01469, 2310.14189).

The student is ``net`` read through the recipe's ``model`` section (its parameterization, schedule and input
scaling) and wrapped as a ``ConsistencyModel`` (``dtrain.samplers.few_step``), so its boundary f(x, t_min) = x is
exact and every sampler, the eval sweep and the bundle kind "consistency" drive it as a denoiser. The loss is
``dtrain.methods.consistency.ConsistencyLoss``; this module only holds the lifecycle:

- the teacher (``teacher``: a checkpoint or bundle, its EMA copy ``method.teacher_ema``) is loaded in ``setup`` and
  never checkpointed; CD takes ODE steps with it (with CFG when ``method.guidance`` != 1); with ``method.init:
  teacher`` the student, its EMA copies and the target start from the teacher's weights (CT / iCT then drop the
  teacher). The student's network must be the teacher's and its schedule the teacher's.
- the target network theta^- (``DiffusionModule.make_target``): ``method.target_ema`` > 0 keeps an EMA copy
  ``target.<tag>.*`` in the checkpoint, updated at the start of each optimizer step with the current weights (so a
  checkpoint taken after step k resumes exactly), its decay CM's mu(k) under the ``ct`` curriculum
  (``ConsistencyLoss.target_decay``); 0 uses the student itself without gradient (iCT).
- per-step randomness (intervals, noise) comes from a generator seeded by (seed, rank, global step, micro-batch), so
  a resumed run repeats the uninterrupted one; N(k) follows the global step.
- the training forward pass reads the network without ``model.clip_x0`` (no dead gradients); sampling, evaluation
  and bundles apply it, as the bundle kind does.
- checkpoints record kind cd / ct / ict (bundle kind "consistency"), the teacher reference, N at the step, and the
  bundle's default sampler: ``consistency`` (the recipe's NFE when its sampler is ``consistency``, else 1 step), on
  [t_max, *method.sample_times, 0] when sample times are given.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dtrain.lit.common import DiffusionModule
from dtrain.methods.consistency import ConsistencyLoss, LPIPSDistance, num_scales, resolve
from dtrain.models import build_denoiser
from dtrain.samplers.few_step import ConsistencyModel

__all__ = ["ConsistencyModule"]


def _scales(recipe: Mapping[str, Any]) -> Any:
    """k -> N(k) of a recipe's consistency method."""
    m, total = resolve(recipe["method"]), int(recipe["trainer"]["max_steps"])  # (resolve fills all three)
    n, s0, s1 = int(m["num_scales"]), int(m["scales_start"]), int(m["scales_end"])
    return lambda k: num_scales(m["curriculum"], k, total, n=n, s0=s0, s1=s1)


class ConsistencyModule(DiffusionModule):
    """See the module docstring. ``teacher`` overrides the recipe's teacher (any denoiser over the recipe's
    schedule, e.g. the exact mixture denoiser in tests)."""

    kind = "cd"
    unsaved_prefixes = ("teacher.", "lpips.")

    def __init__(self, recipe: Any, teacher: Any = None) -> None:
        super().__init__(recipe, teacher)
        self.method = resolve(self.recipe["method"])
        self.kind = self.method["name"]
        lpips = LPIPSDistance() if self.method["distance"] == "lpips" else None
        self.loss_fn = ConsistencyLoss.from_config(self.method, self.schedule, int(self.recipe["trainer"]["max_steps"]),
                                                   lpips=lpips)
        self.make_target(self.target_ema(self.recipe))
        plain = {**dict(self.recipe["model"]), "clip_x0": None}
        nets = {"student": self.net, "target": self.target_net}
        self._cm = {k: ConsistencyModel(build_denoiser(plain, self.schedule, net=v)) for k, v in nets.items()}
        if lpips is not None:
            self.lpips = lpips

    @classmethod
    def target_ema(cls, recipe: Any) -> float:
        return float(resolve(recipe["method"])["target_ema"] or 0.0)

    @classmethod
    def check_resume(cls, path: Path, ckpt: Mapping[str, Any], recipe: Mapping[str, Any], run: Path) -> None:
        """Also: the discretisation N(k) the checkpoint's run would have trained on from the resumed step (its
        curriculum, num_scales, scales_start / scales_end, and trainer.max_steps, over which a curriculum runs) must
        be this recipe's, else a warning (as for the LR schedule's jump): checked at up to 1000 steps."""
        super().check_resume(path, ckpt, recipe, run)
        before = (ckpt.get("dtrain") or {}).get("recipe") or {}
        if not isinstance(before.get("method"), Mapping) or not isinstance(before.get("trainer"), Mapping):
            return
        step = int(ckpt.get("global_step", 0))
        was, now = (_scales(r) for r in (before, recipe))
        end = min(int(before["trainer"]["max_steps"]), int(recipe["trainer"]["max_steps"]))
        ks = sorted({step, end, *range(step, end + 1, max(1, (end - step) // 1000))})
        if (k := next((k for k in ks if was(k) != now(k)), None)) is not None:
            warnings.warn(f"resume: the consistency discretisation differs from the checkpoint's (method.curriculum, "
                          f"num_scales, scales_start / scales_end, or trainer.max_steps under a curriculum): N at "
                          f"step {k} is {now(k)}, the checkpoint's run had {was(k)}", stacklevel=2)

    # ---- teacher and initialisation ---------------------------------------------------------------------------
    @classmethod
    def distils(cls, recipe: Any) -> bool:
        return resolve(recipe["method"])["name"] == "cd"

    @classmethod
    def copies_teacher(cls, recipe: Any) -> tuple[str, ...] | None:
        return () if resolve(recipe["method"])["init"] == "teacher" else None  # the teacher's network exactly

    @property
    def uses_teacher(self) -> bool:
        return bool(self.teacher_needed(self.recipe))

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.teacher is None and self.uses_teacher:
            self.teacher, self.teacher_ref = self.frozen_teacher(self.teacher_source(self._given_teacher),
                                                                 ema=self.method.get("teacher_ema", "auto"),
                                                                 init_from=self.method["init"] == "teacher")
            if self.method["init"] == "teacher":  # a resumed run then restores its own weights over these
                self.init_from_teacher(self.teacher)
            if self.kind != "cd":
                self.teacher = None  # CT / iCT: the teacher only gave the first weights

    # ---- training -----------------------------------------------------------------------------------------
    def teacher_model(self) -> Any:
        """The teacher CD steps with: CFG-guided at ``method.guidance`` for a class-conditional model."""
        w = float(self.method.get("guidance", 1.0))
        return self.guided(self.teacher, w) if self.teacher is not None and w != 1.0 else self.teacher

    def target_decay(self, step: int) -> float | None:
        return self.loss_fn.target_decay(float(self.method["target_ema"]), step)  # CT's mu(k)

    def compute_loss(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        x0, step, g = batch["x"], self.global_step, self.step_generator()
        intervals = self.loss_fn.sample_intervals(x0.shape[0], step, g)
        noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype).to(x0.device)
        cond = batch.get("y") if self.num_classes > 0 else None
        out = self.loss_fn(self._cm["student"], self._cm["target"], x0, cond, step=step, teacher=self.teacher_model(),
                           noise=noise, intervals=intervals)
        return out.loss, out.t

    def step_logs(self, step: int) -> dict[str, float]:
        """A curriculum's N(k) and, under ``ct``, theta^-'s decay mu(k): what the loss trains with at this step."""
        if self.loss_fn.curriculum == "fixed":
            return {}
        mu = self.target_decay(step)
        return {"train/num_scales": float(self.loss_fn.scales(step)), **({} if mu is None else {"train/target_mu": mu})}

    # ---- sampling and checkpoints ----------------------------------------------------------------------------
    def denoiser_for(self, ema: str | None = None) -> Any:
        """The consistency model over the raw network (None) or the EMA copy with that tag (with ``clip_x0``)."""
        if ema not in self._denoisers:
            net = self.net if ema is None else self.ema[ema]  # type: ignore[index]
            self._denoisers[ema] = ConsistencyModel(build_denoiser(self.recipe["model"], self.schedule, net=net))
        return self._denoisers[ema]

    def sample_grids(self) -> dict[tuple[str, int], Tensor]:
        """``method.sample_times``' grid [t_max, *times, 0] at its NFE, as the bundle and ``dtrain eval`` sample it
        (the in-training sweep and grids took the default consistency grid there)."""
        times = self._sample_times()
        if not times:
            return {}
        grid = torch.tensor([float(self.schedule.t_max), *times, 0.0], dtype=torch.float64)
        return {("consistency", len(times) + 1): grid}

    def _sample_times(self) -> list[float]:
        return [float(t) for t in self.method.get("sample_times") or []]

    def checkpoint_info(self) -> dict[str, Any]:
        times = self._sample_times()
        info: dict[str, Any] = {
            "teacher": self.teacher_ref,
            "bundle_kind": "consistency",
            "consistency": {"variant": self.kind, "num_scales": self.loss_fn.scales(self.global_step),
                            "target_ema": float(self.method["target_ema"]), "t_min": float(self.schedule.t_min)},
        }
        s = self.recipe.get("sampler") or {}
        info["sampler"] = {"name": "consistency", "nfe": int(s.get("nfe", 1)) if s.get("name") == "consistency" else 1}
        if times:
            info["sampler"].update(nfe=len(times) + 1, grid=[float(self.schedule.t_max), *times, 0.0])
        return info
