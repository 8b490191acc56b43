"""Ancestral samplers: DDPM's posterior step and Euler-Maruyama on the reverse SDE.

DDPM (Ho et al. 2020, arXiv 2006.11239) for any pair t > s of a grid, so respaced grids get the
respaced posterior (Nichol & Dhariwal 2021, arXiv 2102.09672):
  q(x_s | x_t, x0) = N(alpha_{t|s} sigma_s^2 / sigma_t^2 x_t + alpha_s sigma_{t|s}^2 / sigma_t^2 x0,
                       sigma_{t|s}^2 sigma_s^2 / sigma_t^2)
``variance="small"`` is that posterior variance (beta tilde); ``"large"`` is the upper bound
sigma_{t|s}^2 (beta).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dtrain.diffusion.denoiser import DenoiserLike
from dtrain.diffusion.schedule import transition
from dtrain.samplers.base import Callback, randn_like, scalar, steps

__all__ = ["ddpm", "euler_maruyama"]


@torch.no_grad()
def ddpm(
    denoiser: DenoiserLike,
    x: Tensor,
    grid: Tensor,
    *,
    cond: Any = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    variance: str = "small",
) -> Tensor:
    """Ancestral sampling with the (respaced) DDPM posterior; no noise is added on the last step."""
    if variance not in ("small", "large"):
        raise ValueError(f"ddpm: variance must be 'small' or 'large', got {variance!r}")
    sch = denoiser.schedule
    for i, t, s in steps(grid):
        x0 = denoiser(x, t, cond)
        a_ts, var_ts = transition(sch, t, s)
        s_t2, s_s2 = sch.sigma(t) ** 2, sch.sigma(s) ** 2
        x = scalar(a_ts * s_s2 / s_t2, x) * x + scalar(sch.alpha(s) * var_ts / s_t2, x) * x0
        if s > 0:
            var = var_ts * s_s2 / s_t2 if variance == "small" else var_ts
            x = x + scalar(var.sqrt(), x) * randn_like(x, generator)
        if callback is not None:
            callback({"i": i, "t": t, "s": s, "x": x, "x0": x0})
    return x


@torch.no_grad()
def euler_maruyama(
    denoiser: DenoiserLike,
    x: Tensor,
    grid: Tensor,
    *,
    cond: Any = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Euler-Maruyama on the reverse SDE dx = [f x - g^2 score] dt + g dw (arXiv 2011.13456).

    f = alpha'/alpha and g^2 = 2 sigma sigma' - 2 f sigma^2 for x_t = alpha x0 + sigma eps; the last
    step to t = 0 returns the denoiser's x0.
    """
    sch = denoiser.schedule
    for i, t, s in steps(grid):
        x0 = denoiser(x, t, cond)
        if s == 0:
            x = x0
        else:
            a, sg = sch.alpha(t), sch.sigma(t)
            if a <= 0:
                raise ValueError("euler_maruyama: alpha(t_max) = 0 (pure-noise end); start the grid below it")
            f = sch.alpha_dot(t) / a
            g2 = 2 * sg * sch.sigma_dot(t) - 2 * f * sg**2
            dt = s - t
            eps = (x - scalar(a, x) * x0) / scalar(sg, x)
            drift = scalar(f, x) * x + scalar(g2 / sg, x) * eps  # -g^2 score = g^2 eps / sigma
            x = x + scalar(dt, x) * drift + scalar((g2 * -dt).clamp_min(0).sqrt(), x) * randn_like(x, generator)
        if callback is not None:
            callback({"i": i, "t": t, "s": s, "x": x, "x0": x0})
    return x
