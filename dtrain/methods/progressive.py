"""Progressive distillation (Salimans & Ho 2022, arXiv 2202.00512) and guided progressive distillation (Meng et
al. 2023, arXiv 2210.03142): targets and per-sample losses [B]. Pure torch; teacher and student are passed in.

A round distils a teacher that samples with DDIM on a 2N-step grid into a student taking N steps on every
other point of it. For a student step t -> s (points 2i and 2i + 2 of the teacher's grid) the teacher takes
two DDIM steps through the midpoint t' (point 2i + 1; the paper's t - 1/2N, Algorithm 2):
    x' = p(t, t') x_t + q(t, t') D(x_t, t),    x_s = p(t', s) x' + q(t', s) D(x', t'),
and the student is regressed onto the x0 with which ONE DDIM step t -> s lands on the same x_s:
    x0~ = (x_s - p(t, s) x_t) / q(t, s),    q(t, s) = alpha_s - sigma_s alpha_t / sigma_t > 0
(p, q: ``dtrain.samplers.ddim.ddim_coeffs``). With eps~ = (x_t - alpha_t x0~) / sigma_t the pair (x0~, eps~)
reproduces x_t, and the loss is the teacher's denoising loss (``dtrain.methods.denoising``) with (x0~, eps~) in
place of the data's (x0, eps): any student parameterization (eps / x0 / v / ...), any loss space, and the
paper's weightings "snr_trunc" = max(SNR, 1) and "snr_plus_one" = SNR + 1 (both in x0 units).

Grids nest (``pd_grid``): the N-step grid is every (N0 / N)-th point of the first teacher's N0-step sampler
grid, so each round's teacher was trained on exactly the points its student's targets visit.

Guided PD, stage 1 (``GuidanceLoss``): a w-conditioned student regresses onto the classifier-free-guided teacher
D_u + w (D_c - D_u) at w ~ U[w_min, w_max] on the N0-step grid; the rounds (stage 2) then pass
``GuidedCond(labels, w)`` to teacher and student alike.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dtrain.diffusion.denoiser import Denoiser, DenoiserLike
from dtrain.diffusion.guidance import CFGDenoiser, GuidedCond
from dtrain.diffusion.param import Coeffs, to_x0_eps
from dtrain.diffusion.schedule import Schedule, bcast
from dtrain.diffusion.timesteps import make_grid
from dtrain.methods.denoising import DenoisingLoss, LossOutput, drop_labels
from dtrain.samplers.base import randn_like
from dtrain.samplers.ddim import ddim_coeffs, ddim_step

__all__ = ["Round", "round_plan", "pd_grid", "pd_target", "sample_w", "ProgressiveLoss", "GuidanceLoss"]


@dataclass(frozen=True)
class Round:
    """One round of a progressive run: its student takes ``steps`` sampling steps and trains on global steps
    [start, end). ``kind`` is "pd" (a progressive round) or "guide" (guided PD stage 1, at the teacher's steps)."""

    index: int
    kind: str
    steps: int
    start: int
    end: int

    @property
    def name(self) -> str:
        return f"round{self.index:02d}_{self.steps}steps"


def round_plan(method: Mapping[str, Any], max_steps: int) -> list[Round]:
    """The rounds of a recipe's ``method`` (pd) section over ``trainer.max_steps`` optimizer steps.

    Students take start_steps / 2, start_steps / 4, ..., end_steps steps (after a stage-1 round at start_steps
    when ``guidance`` is set). ``round_steps``: [] splits max_steps evenly, [n] gives every round n, or one
    count per round. Errors are ``ValueError("<recipe key>: <reason>")``.
    """
    n0, n_end, guided = int(method["start_steps"]), int(method["end_steps"]), bool(method.get("guidance"))
    if n_end < 1 or n0 < n_end or n0 % n_end or (n0 // n_end) & (n0 // n_end - 1) or (n0 == n_end and not guided):
        raise ValueError(f"method.start_steps: {n0} must be method.end_steps ({n_end}) times 2, 4, 8, ...")
    counts = [n0] if guided else []
    while (counts[-1] if counts else n0) > n_end:
        counts.append((counts[-1] if counts else n0) // 2)
    k, per = len(counts), [int(v) for v in method.get("round_steps") or []]
    if not per:
        if max_steps % k:
            raise ValueError(f"trainer.max_steps: {max_steps} does not split evenly into {k} rounds; set "
                             f"method.round_steps")
        per = [max_steps // k] * k
    elif len(per) == 1:
        per = per * k
    if len(per) != k or min(per) < 1:
        raise ValueError(f"method.round_steps: need a list of one count >= 1 for all rounds ([n]) or one for each of "
                         f"the {k} rounds (students of {counts} steps), got {per}")
    if sum(per) != max_steps:
        raise ValueError(f"trainer.max_steps: must be the sum of method.round_steps over the {k} rounds, {sum(per)} "
                         f"(or method.round_steps=[] to split max_steps evenly)")
    ends = list(itertools.accumulate(per))
    return [Round(i, "guide" if guided and i == 0 else "pd", n, ends[i] - per[i], ends[i])
            for i, n in enumerate(counts)]


def pd_grid(schedule: Schedule, steps: int, start_steps: int, spacing: str | None = None) -> Tensor:
    """The ``steps``-step grid of a progressive run that starts from the ``start_steps``-step sampler grid
    (``make_grid(schedule, start_steps, spacing)``): every (start_steps / steps)-th point of it."""
    ratio = start_steps // steps if steps >= 1 else 0
    if ratio < 1 or ratio * steps != start_steps or ratio & (ratio - 1):
        raise ValueError(f"method.start_steps: {start_steps} must be {steps} times a power of 2")
    return make_grid(schedule, start_steps, spacing)[::ratio].clone()


@torch.no_grad()
def pd_target(teacher: DenoiserLike, x_t: Tensor, t: Tensor, t_mid: Tensor, s: Tensor, cond: Any = None) -> Tensor:
    """x0~: the x0 a one-step DDIM student at (x_t, t) must predict to land where two teacher DDIM steps
    t -> t_mid -> s land (times [B], float64, s < t_mid < t).

    With the steps x_mid = p1 x_t + q1 D1 and x_s = p2 x_mid + q2 D2 (``ddim_coeffs``; p = p1 p2 and q = p2 q1 + q2
    for t -> s), Alg. 2's (x_s - p x_t) / q is x0~ = (p2 q1 / q) D1 + (q2 / q) D2: the same value without subtracting
    two O(1) terms to get an O(q) one (q is ~1e-4 at a 1000-step grid's first step)."""
    sch = teacher.schedule
    d1 = teacher(x_t, t, cond)
    d2 = teacher(ddim_step(sch, x_t, d1, t, t_mid), t_mid, cond)
    q1 = ddim_coeffs(sch, t, t_mid)[1]
    p2, q2, _ = ddim_coeffs(sch, t_mid, s)
    q = p2 * q1 + q2
    return bcast(p2 * q1 / q, d1) * d1 + bcast(q2 / q, d2) * d2


def sample_w(n: int, w_range: tuple[float, float], generator: torch.Generator | None = None,
             device: torch.device | str = "cpu") -> Tensor:
    """Guidance scales w ~ U[w_min, w_max] (float32 [n])."""
    lo, hi = w_range
    return (lo + (hi - lo) * torch.rand(n, generator=generator)).to(device)


def _draw(n: int, high: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.randint(0, high, (n,), generator=generator).to(device)


class _Regression:
    """The denoising loss onto a teacher's x0 at x_t (shared by both stages)."""

    def __init__(self, schedule: Schedule, param: str, *, weighting: str, target: str | None, sigma_data: float,
                 cfg_dropout: float, num_classes: int) -> None:
        self.schedule, self.cfg_dropout, self.num_classes = schedule, cfg_dropout, num_classes
        self.denoising = DenoisingLoss(schedule, param, target=target, weighting=weighting, sigma_data=sigma_data)

    def drop(self, labels: Tensor | None, generator: torch.Generator | None) -> Tensor | None:
        """Labels with the null class in place of each one with probability ``cfg_dropout`` (before the teacher
        sees them, so teacher and student get the same condition)."""
        if labels is None or self.num_classes == 0 or self.cfg_dropout <= 0:
            return labels
        return drop_labels(labels, self.cfg_dropout, self.num_classes, generator)

    def regress(self, student: Denoiser, x_t: Tensor, x0_target: Tensor, t: Tensor, cond: Any) -> LossOutput:
        """Loss of the student at (x_t, t) against x0~; eps~ is the noise that pairs with it at x_t."""
        eps_target = to_x0_eps("x0", x0_target, x_t, Coeffs.at(self.schedule, t, x_t, derivatives=False))[1]
        return self.denoising(student, x0_target, cond, t=t, noise=eps_target)


class ProgressiveLoss(_Regression):
    """``(student, teacher, x0, grid, cond) -> LossOutput(loss [B], t [B])`` for one progressive round.

    ``grid`` is the teacher's 2N-step grid (2N + 1 float64 points); each sample draws a student step i in
    [0, N) and is noised to t = grid[2i] with fresh noise. ``cond`` is passed unchanged to teacher and student
    (labels, or ``GuidedCond`` for guided rounds); labels are dropped to null with ``cfg_dropout``.
    """

    def __init__(self, schedule: Schedule, param: str = "v", *, weighting: str = "snr_trunc", target: str | None = None,
                 sigma_data: float = 0.5, cfg_dropout: float = 0.0, num_classes: int = 0) -> None:
        super().__init__(schedule, param, weighting=weighting, target=target, sigma_data=sigma_data,
                         cfg_dropout=cfg_dropout, num_classes=num_classes)

    def __call__(self, student: Denoiser, teacher: DenoiserLike, x0: Tensor, grid: Tensor, cond: Any = None, *,
                 idx: Tensor | None = None, noise: Tensor | None = None,
                 generator: torch.Generator | None = None) -> LossOutput:
        n2 = grid.numel() - 1
        if grid.ndim != 1 or n2 < 2 or n2 % 2:
            raise ValueError(f"progressive: the teacher grid needs an even number of steps, got {n2}")
        idx = _draw(x0.shape[0], n2 // 2, generator, x0.device) if idx is None else idx.to(x0.device)
        g = grid.to(x0.device, torch.float64)
        t, t_mid, s = g[2 * idx], g[2 * idx + 1], g[2 * idx + 2]
        eps = randn_like(x0, generator) if noise is None else noise
        if isinstance(cond, GuidedCond):
            cond = GuidedCond(self.drop(cond.labels, generator), cond.w)
        else:
            cond = self.drop(cond, generator)
        x_t = self.schedule.marginal(x0, eps, t)
        return self.regress(student, x_t, pd_target(teacher, x_t, t, t_mid, s, cond), t, cond)


class GuidanceLoss(_Regression):
    """Guided PD stage 1: the w-conditioned student at (x_t, t, w) against the CFG teacher's x0 at scale w.

    Times are the points of the first teacher's N0-step ``grid`` (all but the final 0), w ~ U[w_min, w_max]
    per sample; the student gets ``GuidedCond(labels, w)``.
    """

    def __init__(self, schedule: Schedule, param: str = "v", *, w_range: tuple[float, float], null_label: int,
                 weighting: str = "snr_trunc", target: str | None = None, sigma_data: float = 0.5,
                 cfg_dropout: float = 0.0) -> None:
        super().__init__(schedule, param, weighting=weighting, target=target, sigma_data=sigma_data,
                         cfg_dropout=cfg_dropout, num_classes=null_label)
        self.w_range, self.null_label = (float(w_range[0]), float(w_range[1])), int(null_label)

    def __call__(self, student: Denoiser, teacher: DenoiserLike, x0: Tensor, grid: Tensor, labels: Tensor, *,
                 w: Tensor | None = None, idx: Tensor | None = None, noise: Tensor | None = None,
                 generator: torch.Generator | None = None) -> LossOutput:
        B = x0.shape[0]
        idx = _draw(B, grid.numel() - 1, generator, x0.device) if idx is None else idx.to(x0.device)
        t = grid.to(x0.device, torch.float64)[idx]
        w = sample_w(B, self.w_range, generator, x0.device) if w is None else w.to(x0.device)
        eps = randn_like(x0, generator) if noise is None else noise
        labels = self.drop(labels, generator)
        x_t = self.schedule.marginal(x0, eps, t)
        with torch.no_grad():
            x0_target = CFGDenoiser(teacher, w, self.null_label)(x_t, t, labels)
        return self.regress(student, x_t, x0_target, t, GuidedCond(labels, w))
