"""Ancestral samplers: DDPM's posterior step and Euler-Maruyama on the reverse SDE.

DDPM (Ho et al. 2020, arXiv 2006.11239) for any pair t > s of a grid, so respaced grids get the
respaced posterior (Nichol & Dhariwal 2021, arXiv 2102.09672):
  q(x_s | x_t, x0) = N(alpha_{t|s} sigma_s^2 / sigma_t^2 x_t + alpha_s sigma_{t|s}^2 / sigma_t^2 x0,
                       sigma_{t|s}^2 sigma_s^2 / sigma_t^2)
``variance="small"`` is that posterior variance (beta tilde); ``"large"`` is the upper bound
sigma_{t|s}^2 (beta). The step that lands on t = 0 adds no noise; diffusers' DDPMScheduler adds it whenever the
current index is > 0, so on a trailing grid (last index 1000 / n - 1, not 0) its "fixed_large" last step adds
N(0, 1 - alpha_bar) noise to the sample where this one does not.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dtrain.diffusion.denoiser import DenoiserLike
from dtrain.diffusion.schedule import transition
from dtrain.samplers.base import Callback, on_grid, randn_like

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
    """Ancestral sampling with the (respaced) DDPM posterior; no noise is added on the last step.

    One normal draw of x's shape per step that does not land on t = 0, after the denoiser call
    (the order of diffusers' ``DDPMScheduler``).
    """
    if variance not in ("small", "large"):
        raise ValueError(f"ddpm: variance must be 'small' or 'large', got {variance!r}")
    sch = denoiser.schedule
    g, _ = on_grid(sch, grid)
    t, s = g[:-1], g[1:]
    a_ts, var_ts = transition(sch, t, s)
    s_t2, s_s2 = sch.sigma(t) ** 2, sch.sigma(s) ** 2
    c_x = (a_ts * s_s2 / s_t2).tolist()  # the posterior mean's weights on x_t and on x0_hat
    c_x0 = (sch.alpha(s) * var_ts / s_t2).tolist()
    std = (var_ts * s_s2 / s_t2 if variance == "small" else var_ts).sqrt().tolist()
    for i in range(len(c_x)):
        x0 = denoiser(x, g[i], cond)
        x = c_x[i] * x + c_x0[i] * x0
        if g[i + 1] > 0:
            x = x + std[i] * randn_like(x, generator)
        if callback is not None:
            callback({"i": i, "t": g[i], "s": g[i + 1], "x": x, "x0": x0})
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
    g, (a, sg) = on_grid(sch, grid, "alpha", "sigma")
    t, s = g[:-1], g[1:]
    a_t, s_t = sch.alpha(t), sch.sigma(t)
    if bool(((a_t <= 0) & (s > 0)).any()):
        raise ValueError("euler_maruyama: alpha(t_max) = 0 (pure-noise end); start the grid below it")
    f = sch.alpha_dot_below(t) / a_t  # the step goes down from t
    g2 = 2 * s_t * sch.sigma_dot_below(t) - 2 * f * s_t**2
    dt = s - t
    drift_x, drift_eps = f.tolist(), (g2 / s_t).tolist()  # -g^2 score = g^2 eps / sigma
    noise = (g2 * -dt).clamp_min(0).sqrt().tolist()
    dt = dt.tolist()
    for i in range(len(dt)):
        x0 = denoiser(x, g[i], cond)
        if g[i + 1] == 0:
            x = x0
        else:
            eps = (x - a[i] * x0) / sg[i]
            drift = drift_x[i] * x + drift_eps[i] * eps
            x = x + dt[i] * drift + noise[i] * randn_like(x, generator)
        if callback is not None:
            callback({"i": i, "t": g[i], "s": g[i + 1], "x": x, "x0": x0})
    return x
