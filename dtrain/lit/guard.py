"""Non-finite guard: an optimizer step whose loss or gradients are not finite is skipped, counted and logged.

``DiffusionModule`` (and so every student) feeds the guard each micro-batch's per-sample loss (``observe``,
on device, no host sync) and asks it once per optimizer step, after the backward and before clipping
(``check``): one host sync of one bool per step (plus one all-reduce of it under multi-process training, so
every rank takes the same decision). A bad step drops the gradients (``p.grad = None``: AdamW then leaves
weights, moments and its step count untouched), the EMA update is skipped (``skipped``), and the step is
logged with its loss terms; ``train/bad_steps`` counts them. ``max_bad`` bad steps in a row stop the run with
``NonFiniteError`` naming the step and the loss terms. The global step and the LR schedule still advance
(the batch was consumed), so data position and resume stay exact.

Under a loss scaler (``16-mixed``) non-finite gradients are the scaler's business (it skips the step and
lowers the scale); the guard then judges the loss only. Under DeepSpeed the gradients live in the engine, which
takes the optimizer step (its ZeRO-2 optimizer skips one with non-finite gradients itself, bf16 and fp32 alike):
the guard skips the EMA update, counts and stops.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["NonFiniteGuard", "NonFiniteError"]

log = logging.getLogger("dtrain.guard")


class NonFiniteError(RuntimeError):
    """Too many non-finite optimizer steps in a row."""


class NonFiniteGuard:
    """See the module docstring. ``max_bad``: bad steps in a row that stop the run; ``enabled=False``: no checks."""

    def __init__(self, max_bad: int = 10, enabled: bool = True) -> None:
        self.max_bad, self.enabled = int(max_bad), bool(enabled)
        self.total = 0  # bad steps in this run (restored on resume)
        self.in_a_row = 0
        self.skipped = False  # the last optimizer step was skipped
        self._ok: Tensor | None = None  # AND of this step's micro-batch loss checks, on device (None: none yet)
        self._terms: list[dict[str, Tensor]] = []  # each micro-batch's of the last step (gradient accumulation)

    # ---- per micro-batch (no host sync) --------------------------------------------------------------------
    def observe(self, loss_b: Tensor, terms: Mapping[str, Tensor] | None = None) -> None:
        """Record a micro-batch's per-sample loss [B] (and named extra terms, for the message)."""
        if not self.enabled:
            return
        ok = torch.isfinite(loss_b).all()
        if self._ok is None:  # the step's first micro-batch: the last step's terms were described already
            self._terms = []
        self._ok = ok if self._ok is None else self._ok & ok
        self._terms.append({"loss": loss_b.detach(), **{k: v.detach() for k, v in (terms or {}).items()}})

    # ---- per optimizer step ----------------------------------------------------------------------------------
    def check(self, grad_norm: Tensor | None, *, world_size: int = 1, judge_grads: bool = True) -> bool:
        """True when the step may proceed; updates the counters. ``grad_norm``: the global gradient norm
        (None: unknown). One host sync."""
        if not self.enabled:
            self.skipped = False
            return True
        ok = self._ok if self._ok is not None else torch.ones((), dtype=torch.bool)
        if judge_grads and grad_norm is not None:
            ok = ok.to(grad_norm.device) & torch.isfinite(grad_norm)
        if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = ok.to(torch.float32).reshape(1)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            ok = flag[0] > 0
        good = bool(ok.item())
        self._grad_norm = grad_norm
        self._ok = None
        self.skipped = not good
        if good:
            self.in_a_row = 0
        else:
            self.total += 1
            self.in_a_row += 1
        return good

    def describe(self) -> str:
        """The last step's loss terms and gradient norm, e.g. ``loss=nan (3/32 samples non-finite), grad_norm=inf``:
        of its first micro-batch with a non-finite term (else its last), and which one under accumulation."""
        bad_one = [i for i, t in enumerate(self._terms) if not all(bool(torch.isfinite(v).all()) for v in t.values())]
        i = bad_one[0] if bad_one else len(self._terms) - 1
        parts = [f"micro-batch {i + 1}/{len(self._terms)}"] if len(self._terms) > 1 else []
        for name, v in (self._terms[i] if self._terms else {}).items():
            v = v.float().reshape(-1)
            bad = int((~torch.isfinite(v)).sum())
            mean = float(v.mean()) if v.numel() else math.nan
            parts.append(f"{name}={mean:.4g}" + (f" ({bad}/{v.numel()} samples non-finite)" if bad else ""))
        g = getattr(self, "_grad_norm", None)
        if g is not None:
            parts.append(f"grad_norm={float(g):.4g}")
        return ", ".join(parts) or "no loss recorded"

    def report(self, step: int, *, dropped: bool = True) -> None:
        """Log a bad step; raise ``NonFiniteError`` after ``max_bad`` in a row. ``dropped=False``: the optimizer
        stepped anyway (DeepSpeed's engine owns the gradients), only the EMA update was skipped."""
        what = "optimizer and EMA update skipped" if dropped else "EMA update skipped (the optimizer step is " \
            "DeepSpeed's)"
        msg = f"step {step}: non-finite loss or gradient ({self.describe()}); {what} " \
              f"({self.in_a_row} in a row, {self.total} in this run)"
        if self.in_a_row >= self.max_bad:
            raise NonFiniteError(f"{msg}; stopping: trainer.max_bad_steps={self.max_bad} reached. Lower optim.lr, "
                                 f"check the data (non-finite inputs?) or resume from an earlier checkpoint")
        log.warning(msg)

    # ---- checkpoint ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.total, self.in_a_row = int(state.get("total", 0)), int(state.get("in_a_row", 0))
