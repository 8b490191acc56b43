"""Euler and Heun on the probability-flow ODE dx/dt = alpha' x0_hat + sigma' eps_hat.

For EDM's schedule (alpha = 1, sigma = t) this is EDM's Algorithm 1 without churn (Karras et al. 2022,
arXiv 2206.00364); for rectified flow it integrates the velocity field (arXiv 2209.03003). A step that lands
on t = 0 returns x0_hat, with no correction (2n - 1 evaluations for n Heun steps): EDM's sigma-space step to
sigma = 0 and the flow's step to t = 0 are exactly that, while on VP schedules a straight step in t would keep
(sigma(t) - t sigma'(t)) eps_hat of noise, sigma growing like sqrt(t) near 0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dtrain.diffusion.denoiser import DenoiserLike
from dtrain.diffusion.param import Coeffs, velocity_ode
from dtrain.diffusion.schedule import bcast
from dtrain.samplers.base import Callback, on_grid

__all__ = ["euler", "heun", "heun_step"]


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
    g, c = on_grid(denoiser.schedule, grid, "alpha", "sigma", "alpha_dot_below", "sigma_dot_below")
    for i in range(len(g) - 1):
        x0 = denoiser(x, g[i], cond)
        x = x0 if g[i + 1] == 0 else x + float(g[i + 1] - g[i]) * velocity_ode(x0, x, Coeffs(*(q[i] for q in c)))
        if callback is not None:
            callback({"i": i, "t": g[i], "s": g[i + 1], "x": x, "x0": x0})
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
    g, c = on_grid(denoiser.schedule, grid, "alpha", "sigma", "alpha_dot_below", "sigma_dot_below", "alpha_dot",
                   "sigma_dot")
    for i in range(len(g) - 1):
        t, s = g[i], g[i + 1]  # each end's derivatives from inside [s, t] (they differ at a discrete schedule's knot)
        c_t, c_s = Coeffs(*(q[i] for q in c[:4])), Coeffs(*(q[i + 1] for q in (*c[:2], *c[4:])))
        x, x0 = heun_step(denoiser, x, t, s, cond, c_t, c_s)
        if callback is not None:
            callback({"i": i, "t": t, "s": s, "x": x, "x0": x0})
    return x


def heun_step(
    denoiser: DenoiserLike,
    x: Tensor,
    t: Tensor,
    s: Tensor,
    cond: Any = None,
    c_t: Coeffs | None = None,
    c_s: Coeffs | None = None,
) -> tuple[Tensor, Tensor]:
    """One Heun step t -> s: Euler predictor, trapezoidal corrector; to s = 0 it is x0_hat(t) (the module docstring);
    returns (x_s, x0_hat(t)).

    t, s: 0-d grid times (``c_t``, ``c_s``: their precomputed coefficients) or per-sample float64 [B] times, as
    consistency distillation uses them (coefficients built here; every s must then be > 0).
    """
    per_sample = t.ndim > 0
    if per_sample and not bool((s > 0).all()):
        raise ValueError("heun_step: per-sample target times s must be > 0 (a step to 0 is x0_hat; pass 0-d times)")
    sch = denoiser.schedule
    dt = bcast(s - t, x) if per_sample else float(s - t)
    x0 = denoiser(x, t, cond)
    if not per_sample and s == 0:
        return x0, x0
    v = velocity_ode(x0, x, c_t or Coeffs.at(sch, t, x, below=True))
    x_e = x + dt * v
    v2 = velocity_ode(denoiser(x_e, s, cond), x_e, c_s or Coeffs.at(sch, s, x))
    return x + dt * 0.5 * (v + v2), x0
