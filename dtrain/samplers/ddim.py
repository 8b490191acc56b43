"""DDIM (Song, Meng & Ermon 2021, arXiv 2010.02502): eta in [0, 1], any grid; inversion; slerp.

Written for any schedule through alpha, sigma: x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps_hat + c z,
c = eta sigma_s sigma_{t|s} / sigma_t (eta = 1 is DDPM's ancestral step with the posterior variance).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dtrain.diffusion.denoiser import DenoiserLike
from dtrain.diffusion.schedule import transition
from dtrain.diffusion.timesteps import check_grid
from dtrain.samplers.base import Callback, randn_like, scalar, steps

__all__ = ["ddim", "ddim_invert", "slerp"]


@torch.no_grad()
def ddim(
    denoiser: DenoiserLike,
    x: Tensor,
    grid: Tensor,
    *,
    cond: Any = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM from x = x_{grid[0]} down the grid; eta = 0 is the deterministic probability-flow map."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"ddim: eta must be in [0, 1], got {eta}")
    sch = denoiser.schedule
    for i, t, s in steps(grid):
        x0 = denoiser(x, t, cond)
        a_t, s_t, a_s, s_s = sch.alpha(t), sch.sigma(t), sch.alpha(s), sch.sigma(s)
        eps = (x - scalar(a_t, x) * x0) / scalar(s_t, x)
        c = eta * s_s * transition(sch, t, s)[1].sqrt() / s_t if eta > 0 else torch.zeros((), dtype=torch.float64)
        x = scalar(a_s, x) * x0 + scalar((s_s**2 - c**2).clamp_min(0).sqrt(), x) * eps
        if eta > 0:
            x = x + scalar(c, x) * randn_like(x, generator)
        if callback is not None:
            callback({"i": i, "t": t, "s": s, "x": x, "x0": x0})
    return x


@torch.no_grad()
def ddim_invert(
    denoiser: DenoiserLike,
    x0: Tensor,
    grid: Tensor,
    *,
    cond: Any = None,
    callback: Callback | None = None,
    fixed_point_iters: int = 0,
) -> Tensor:
    """Deterministic DDIM inversion x_0 -> x_{grid[0]} along ``grid`` (given as for sampling).

    Each step s -> t evaluates the denoiser at the known point (at the grid's smallest time when
    s = 0), then ``fixed_point_iters`` refinements re-evaluate it at the new point so the step
    becomes the exact inverse of the sampling step (Pan et al. 2023, arXiv 2312.12540).
    """
    g = check_grid(grid).flip(0)
    sch = denoiser.schedule
    x = x0
    for i in range(g.numel() - 1):
        s, t = g[i], g[i + 1]
        s_eval = s if s > 0 else g[1]
        a_s, s_s, a_t, s_t = sch.alpha(s), sch.sigma(s), sch.alpha(t), sch.sigma(t)
        xs = x
        d = denoiser(xs, s_eval, cond)
        eps = (xs - scalar(sch.alpha(s_eval), xs) * d) / scalar(sch.sigma(s_eval), xs)
        x = scalar(a_t, xs) * d + scalar(s_t, xs) * eps
        for _ in range(fixed_point_iters):  # solve x_s = (a_s/a_t) x + (s_s - a_s s_t / a_t) eps(x, t)
            d = denoiser(x, t, cond)
            eps = (x - scalar(a_t, x) * d) / scalar(s_t, x)
            x = scalar(a_t / a_s, xs) * (xs - scalar(s_s - a_s * s_t / a_t, xs) * eps)
        if callback is not None:
            callback({"i": i, "t": s, "s": t, "x": x, "x0": d})
    return x


def slerp(z0: Tensor, z1: Tensor, alpha: float | Tensor) -> Tensor:
    """Spherical interpolation between two Gaussian latents (Shoemake 1985; used in arXiv 2010.02502)."""
    a, b = z0.flatten(1).double(), z1.flatten(1).double()
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    theta = torch.acos(cos.clamp(-1, 1)).reshape(-1, *([1] * (z0.ndim - 1)))
    alpha = torch.as_tensor(alpha, dtype=torch.float64)
    sin = torch.sin(theta)
    w0 = torch.where(sin.abs() > 1e-6, torch.sin((1 - alpha) * theta) / sin, 1 - alpha)
    w1 = torch.where(sin.abs() > 1e-6, torch.sin(alpha * theta) / sin, alpha)
    return (w0 * z0.double() + w1 * z1.double()).to(z0.dtype)
