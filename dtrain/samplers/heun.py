"""Euler and Heun on the probability-flow ODE dx/dt = alpha' x0_hat + sigma' eps_hat.

For EDM's schedule (alpha = 1, sigma = t) this is EDM's Algorithm 1 without churn (Karras et al. 2022,
arXiv 2206.00364); for rectified flow it integrates the velocity field (arXiv 2209.03003). Heun skips
its correction on a step that lands on t = 0 (2n - 1 evaluations for n steps).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dtrain.diffusion.denoiser import DenoiserLike
from dtrain.diffusion.param import Coeffs, velocity_ode
from dtrain.diffusion.schedule import Schedule
from dtrain.samplers.base import Callback, scalar, steps

__all__ = ["euler", "heun"]


def _velocity(denoiser: DenoiserLike, x: Tensor, t: Tensor, cond: Any) -> tuple[Tensor, Tensor]:
    x0 = denoiser(x, t, cond)
    sch: Schedule = denoiser.schedule
    return velocity_ode(x0, x, Coeffs.at(sch, t, x)), x0


@torch.no_grad()
def euler(
    denoiser: DenoiserLike,
    x: Tensor,
    grid: Tensor,
    *,
    cond: Any = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """First-order Euler steps (n evaluations for n steps)."""
    for i, t, s in steps(grid):
        v, x0 = _velocity(denoiser, x, t, cond)
        x = x + scalar(s - t, x) * v
        if callback is not None:
            callback({"i": i, "t": t, "s": s, "x": x, "x0": x0})
    return x


@torch.no_grad()
def heun(
    denoiser: DenoiserLike,
    x: Tensor,
    grid: Tensor,
    *,
    cond: Any = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Second-order Heun (trapezoidal predictor-corrector) steps."""
    for i, t, s in steps(grid):
        v, x0 = _velocity(denoiser, x, t, cond)
        x_e = x + scalar(s - t, x) * v
        if s > 0:
            v2, _ = _velocity(denoiser, x_e, s, cond)
            x = x + scalar(s - t, x) * 0.5 * (v + v2)
        else:
            x = x_e
        if callback is not None:
            callback({"i": i, "t": t, "s": s, "x": x, "x0": x0})
    return x
