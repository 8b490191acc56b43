"""Flow-map students in ``dtrain fit``: MeanFlow (``method.name: meanflow``, arXiv 2505.13447) and CTM
(``method.name: ctm``, arXiv 2310.02279). The losses are ``dtrain.methods.flow_map``; this module holds the lifecycle:

- the network is built with ``model.second_time`` and read as ``MeanFlowModel`` / ``CTMModel``
  (``dtrain.samplers.few_step``): ``denoiser_for`` returns that flow map, so sample grids, the eval sweep and the
  bundle kinds "meanflow" / "ctm" drive it with the few-step samplers (``flowmap``, ``flowmap_gamma``) or, through
  its denoiser view (s = t), with any other sampler;
- the teacher (``teacher``: a checkpoint or bundle; a ``teacher`` argument overrides it, e.g. the exact mixture
  denoiser in tests) is loaded in ``setup`` and never checkpointed. CTM needs it on its own schedule and starts the
  student, and its EMA copies, from the teacher's weights (the second-time embedding starts at zero, so the student
  begins as the teacher's one-time denoiser). MeanFlow takes it optionally, as the velocity of its target (read
  through ``Rescheduled`` when the teacher's schedule is not the flow schedule); it trains from scratch, or with
  ``method.init: teacher`` from the teacher's weights: its network and schedule are then the teacher's, read on the
  flow schedule at the same log-SNR (``MeanFlowModel``'s ``denoiser``), so it starts as the teacher's DDIM;
- per-step randomness (times, noise, dropped labels) comes from a generator seeded by (seed, rank, global step,
  micro-batch), so a resumed run repeats the uninterrupted one;
- MeanFlow's JVP under DDP: ``method.jvp: detached`` (default) takes the gradient through an ordinary forward, which
  DDP synchronises as for any loss. ``method.jvp: fused`` takes it through the JVP's primal output; forward-mode AD
  is outside DDP's contract (pytorch#102197: it fires the reducer's hooks only when the JVP happens to run inside the
  DDP-wrapped forward, never for ``model.module``), so this module switches DDP's reducer off for the step and
  all-reduces the network's gradients itself after backward, on every DDP setup alike.
- CTM's target network theta^- (``method.target_ema``, ``DiffusionModule.make_target``): an EMA copy of the student
  (checkpointed, started from the teacher's weights), or the student itself without gradient (0).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from dtrain.errors import InputError
from dtrain.lit.common import DiffusionModule
from dtrain.methods.flow_map import CTMLoss, MeanFlowLoss, Rescheduled

__all__ = ["FlowMapModule", "MeanFlowModule", "CTMModule", "all_reduce_grads"]


def all_reduce_grads(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Average the gradients of ``params`` over the default process group, in one flat buffer."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(world_size)
    i = 0
    for g in grads:
        g.copy_(flat[i: i + g.numel()].view_as(g))
        i += g.numel()


class FlowMapModule(DiffusionModule):
    """Shared by MeanFlow and CTM: the flow-map views, the teacher, per-step generators, checkpoint metadata."""

    unsaved_prefixes = ("teacher.",)
    needs_teacher = False

    def __init__(self, recipe: Any, teacher: Any = None) -> None:
        super().__init__(recipe, teacher)
        if not self.recipe["model"].get("second_time"):
            raise InputError(f"model.second_time: must be true for method {self.recipe['method']['name']!r} "
                             f"(the network embeds the target time of a jump)")

    def flow_map(self, net: torch.nn.Module) -> Any:
        """``net`` read as this student's flow map: the bundle kind's builder (training, sampling and bundles agree)."""
        from dtrain.export.bundle import KINDS

        return KINDS.get(self.kind, "bundle kind").build(net, self.schedule, self.recipe["model"])

    @classmethod
    def distils(cls, recipe: Any) -> bool:
        return cls.needs_teacher

    @classmethod
    def copies_teacher(cls, recipe: Any) -> tuple[str, ...] | None:
        return ("second_time",) if cls._init_teacher(recipe) else None  # the teacher's network plus the s embedding

    @classmethod
    def reads_teacher(cls, recipe: Any) -> bool:
        return True  # MeanFlow from scratch takes a teacher's velocity as its target when one is given

    @classmethod
    def teacher_target(cls, recipe: Any) -> bool:
        return True  # a teacher, when given, is the target; none: the data's

    @classmethod
    def teacher_on_my_schedule(cls, recipe: Any) -> bool:
        # the student starts as the teacher's network on its schedule; CTM's targets solve the teacher's ODE on the
        # student's grid; MeanFlow from scratch reads a teacher on another schedule through its rescheduling
        return cls._init_teacher(recipe) or getattr(cls, "kind", None) == "ctm"

    @classmethod
    def _init_teacher(cls, recipe: Any) -> bool:
        return recipe["method"].get("init", "teacher" if cls.needs_teacher else "scratch") == "teacher"

    @property
    def init_teacher(self) -> bool:
        return self._init_teacher(self.recipe)

    def denoiser_for(self, ema: str | None = None) -> Any:
        """The flow map over the raw network (None) or the EMA copy with that tag."""
        if ema not in self._denoisers:
            self._denoisers[ema] = self.flow_map(self.net if ema is None else self.ema[ema])  # type: ignore[index]
        return self._denoisers[ema]

    def _load_teacher(self) -> Any:
        """The frozen teacher (or None when the recipe has none and the method does not need one)."""
        if (source := self.teacher_source(self._given_teacher)) is None:
            return None
        teacher, self.teacher_ref = self.frozen_teacher(source, ema=self.recipe["method"].get("teacher_ema", "auto"),
                                                        same_schedule=self.teacher_on_my_schedule(self.recipe),
                                                        init_from=self.init_teacher)
        return teacher

    def labels(self, batch: Mapping[str, Tensor]) -> Tensor | None:
        return batch.get("y") if self.num_classes > 0 else None

    def checkpoint_info(self) -> dict[str, Any]:
        return {"teacher": self.teacher_ref, "bundle_kind": self.kind}


class MeanFlowModule(FlowMapModule):
    """MeanFlow: ``MeanFlowLoss`` on the flow schedule, optionally with a teacher's velocity."""

    kind = "meanflow"
    explicit_sync = True  # the fused JVP's all-reduce (tests switch it off to show the ranks then drift apart)

    def __init__(self, recipe: Any, teacher: Any = None) -> None:
        super().__init__(recipe, teacher)
        self.flow = self.denoiser_for(None).schedule  # the flow schedule u lives on (self.schedule: the network's)
        self.loss_fn = MeanFlowLoss.from_config(self.recipe["method"], self.recipe["model"], self.flow)
        self._ddp_off = False
        c_scale = self.flow.c_scale  # a FlowSchedule (MeanFlowModel requires one)
        if self.denoiser_for(None)._clean is None and c_scale > 100:  # the network takes the flow's c_noise itself
            warnings.warn(f"schedule.c_scale: {c_scale:g}: the network sees {c_scale:g} t, and MeanFlow's target "
                          f"differentiates it in t through time features that oscillate that fast (on the digits, "
                          f"800 steps: 1-step FID-digits 3.4 at 1000 against 1.1 at 1); the paper's code feeds t in "
                          f"[0, 1]: set schedule.c_scale: 1", stacklevel=2)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.teacher is None:
            teacher = self._load_teacher()
            if teacher is not None and self.init_teacher:
                self._warn_discrete_teacher()
                self.init_from_teacher(teacher)  # a resumed run restores its own weights over these
            if teacher is not None and teacher.schedule.to_dict() != self.flow.to_dict():
                teacher = Rescheduled(teacher, self.flow)
            w = float(self.recipe["method"].get("cfg_omega", 1.0))
            if teacher is not None and w != 1.0 and self.num_classes > 0:
                teacher = self.guided(teacher, w)  # distillation: CFG on the teacher's velocity
            self.teacher = teacher

    def _warn_discrete_teacher(self) -> None:
        """MeanFlow's target differentiates the student's network in t; one copied from a teacher trained only at its
        T timesteps wiggles between them (the time embedding's top frequency is one radian a step): on the digits
        teacher, du/dt by the JVP errs 9x more (mean squared) than a central difference over +-3 steps."""
        method = (self.teacher_recipe or {}).get("method") or {}
        if method.get("time_sampling") == "uniform_discrete":
            warnings.warn(f"teacher: trained at discrete timesteps (method.time_sampling: uniform_discrete, "
                          f"{(self.teacher_ref or {}).get('path')}); MeanFlow from its weights differentiates its "
                          f"network between them, where it wiggles: train the teacher with continuous times "
                          f"(method.time_sampling: uniform or logit_normal)", stacklevel=2)

    def compute_loss(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        out = self.loss_fn(self.denoiser_for(None), batch["x"], self.labels(batch), teacher=self.teacher,
                           generator=self.step_generator())
        return out.loss, out.t

    # ---- explicit gradient synchronisation of the fused JVP ---------------------------------------------------
    def _ddp(self) -> Any:
        from torch.nn.parallel import DistributedDataParallel

        model = getattr(self.trainer.strategy, "model", None) if self._trainer is not None else None
        return model if isinstance(model, DistributedDataParallel) else None

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        ddp = self._ddp() if self.loss_fn.jvp == "fused" else None
        if ddp is not None and ddp.require_backward_grad_sync:  # DDP's reducer sits this step out (see docstring)
            ddp.require_backward_grad_sync, self._ddp_off = False, True
        return super().training_step(batch, batch_idx)

    def on_after_backward(self) -> None:
        if self._ddp_off:
            self._ddp().require_backward_grad_sync, self._ddp_off = True, False
            if self.explicit_sync:
                all_reduce_grads(list(self.net.parameters()), self.trainer.world_size)


class CTMModule(FlowMapModule):
    """CTM: ``CTMLoss`` distilling the teacher on its own schedule, the student initialised from it."""

    kind = "ctm"
    needs_teacher = True

    @classmethod
    def target_ema(cls, recipe: Any) -> float:
        return float(recipe["method"].get("target_ema", 0.0) or 0.0)

    def __init__(self, recipe: Any, teacher: Any = None) -> None:
        super().__init__(recipe, teacher)
        self.loss_fn = CTMLoss.from_config(self.recipe["method"], self.recipe["model"], self.schedule)
        self.make_target(self.target_ema(self.recipe))
        self._target_map = self.flow_map(self.target_net) if self.target is not None else None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.teacher is None:
            self.teacher = self._load_teacher()
            if self.init_teacher:  # a resumed run restores its own weights over these
                self.init_from_teacher(self.teacher)

    def compute_loss(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        out = self.loss_fn(self.denoiser_for(None), self.teacher, batch["x"], self.labels(batch),
                           target=self._target_map, generator=self.step_generator())
        return out.loss, out.t
