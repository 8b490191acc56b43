"""DDIM (Song, Meng & Ermon 2021, arXiv 2010.02502): eta in [0, 1], any grid; inversion; slerp.

Written for any schedule through alpha, sigma: x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps_hat + c z,
c = eta sigma_s sigma_{t|s} / sigma_t (eta = 1 is DDPM's ancestral step with the posterior variance).
With eps_hat = (x_t - alpha_t x0) / sigma_t a step is x_s = p x_t + q x0 + c z, p and q precomputed per grid.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dtrain.diffusion.denoiser import DenoiserLike
from dtrain.diffusion.schedule import Schedule, bcast, transition
from dtrain.errors import InputError
from dtrain.samplers.base import Callback, on_grid, randn_like

__all__ = ["ddim", "ddim_coeffs", "ddim_step", "ddim_invert", "slerp"]


def ddim_coeffs(schedule: Schedule, t: Tensor, s: Tensor, eta: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """(p, q, c) of the DDIM step x_s = p x_t + q x0_hat + c z from t to s < t, float64, elementwise over t and s
    (a grid's steps, or per-sample times [B] as progressive distillation uses them)."""
    (a_t, s_t), (a_s, s_s) = schedule.alpha_sigma(t), schedule.alpha_sigma(s)
    var = transition(schedule, t, s)[1] if eta > 0 else torch.zeros_like(s_t)
    c = eta * s_s * var.sqrt() / s_t  # noise std of the step
    p = (s_s**2 - c**2).clamp_min(0).sqrt() / s_t  # eps_hat's weight over sigma_t
    return p, a_s - p * a_t, c


def ddim_step(schedule: Schedule, x: Tensor, x0: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """One deterministic DDIM step t -> s with prediction x0; times 0-d or per-sample [B] (float64), as progressive
    distillation's target and the students' teacher steps use it."""
    p, q, _ = ddim_coeffs(schedule, t, s)
    return bcast(p, x) * x + bcast(q, x) * x0


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
    """DDIM from x = x_{grid[0]} down the grid; eta = 0 is the deterministic probability-flow map.

    With eta > 0 one normal draw of x's shape per step comes from ``generator`` after the
    denoiser call (the last step's draw is multiplied by 0), as in diffusers' ``DDIMScheduler``.
    """
    if not 0.0 <= eta <= 1.0:
        raise InputError(f"ddim: eta must be in [0, 1], got {eta}")
    g, _ = on_grid(denoiser.schedule, grid)
    p, q, c = (v.tolist() for v in ddim_coeffs(denoiser.schedule, g[:-1], g[1:], eta))
    for i in range(len(p)):
        t, s = g[i], g[i + 1]
        x0 = denoiser(x, t, cond)
        x = p[i] * x + q[i] * x0
        if eta > 0:
            x = x + c[i] * randn_like(x, generator)
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

    Each step s -> t evaluates the denoiser at the known point x_s and moves with that x0_hat and eps_hat: a
    first-order approximation of the inverse. From clean data (sigma_s = 0) x0 is known: eps_hat is read at the
    first noisy time (x_0 taken as x_t there) and the step is x_t = alpha_t x_0 + sigma_t eps_hat (moving with
    that x0_hat would give x_t = x_0 back).
    ``fixed_point_iters`` refinements then re-evaluate the denoiser at the new point x_t and solve
    ``ddim_step(x_t) = x_s`` by fixed-point iteration, so the step becomes the exact inverse of the
    sampling step as the iterations converge (Meiri et al. 2023, arXiv 2312.12540):
    x_t <- (a_t / a_s)(x_s - (s_s - a_s s_t / a_t) eps_hat(x_t)), or x_t <- (s_t / s_s)(x_s - a_s D(x_t))
    where alpha_t = 0. A grid of one step from clean data to alpha = 0 is not invertible (D is constant there).
    """
    if not isinstance(fixed_point_iters, int) or isinstance(fixed_point_iters, bool) or fixed_point_iters < 0:
        raise ValueError(f"ddim_invert: fixed_point_iters must be an int >= 0, got {fixed_point_iters!r}")
    sch = denoiser.schedule
    g, (a, sg) = on_grid(sch, grid, "alpha", "sigma")
    g, a, sg = g.flip(0), a[::-1], sg[::-1]  # increasing: g[0] (usually 0) < g[1] < ...
    x = x0.float() if x0.dtype in (torch.float16, torch.bfloat16) else x0  # as ``run``: no half-precision state
    for i in range(len(a) - 1):
        s, t = g[i], g[i + 1]
        j = i if sg[i] > 0 else i + 1  # evaluate at the known point, or at the first noisy time from x_0
        xs = x
        d = denoiser(xs, g[j], cond)
        eps = (xs - a[j] * d) / sg[j]
        if j != i:  # from clean data: x0 is known
            d = xs
        x = a[i + 1] * d + sg[i + 1] * eps
        for _ in range(fixed_point_iters):
            d = denoiser(x, t, cond)
            if a[i + 1] > 0:  # x_s = (a_s / a_t) x_t + (s_s - a_s s_t / a_t) eps(x_t), solved for x_t
                e = (x - a[i + 1] * d) / sg[i + 1]
                x = (a[i + 1] / a[i]) * (xs - (sg[i] - a[i] * sg[i + 1] / a[i + 1]) * e)
            elif sg[i] > 0:  # alpha_t = 0 (pure-noise end): x_s = a_s d + (s_s / s_t) x_t
                x = (sg[i + 1] / sg[i]) * (xs - a[i] * d)
        if callback is not None:
            callback({"i": i, "t": s, "s": t, "x": x, "x0": d})
    return x.to(x0.dtype)


def slerp(z0: Tensor, z1: Tensor, alpha: float | Tensor) -> Tensor:
    """Spherical interpolation between two Gaussian latents (Shoemake 1985; used in arXiv 2010.02502); ``alpha`` one
    number or one per sample [B]."""
    a, b = z0.flatten(1).double(), z1.flatten(1).double()
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    theta = torch.acos(cos.clamp(-1, 1)).reshape(-1, *([1] * (z0.ndim - 1)))
    alpha = torch.as_tensor(alpha, dtype=torch.float64, device=theta.device)
    alpha = alpha.reshape(theta.shape) if alpha.ndim == 1 else alpha  # one per sample: [B] -> [B, 1, ...]
    sin = torch.sin(theta)
    w0 = torch.where(sin.abs() > 1e-6, torch.sin((1 - alpha) * theta) / sin, 1 - alpha)
    w1 = torch.where(sin.abs() > 1e-6, torch.sin(alpha * theta) / sin, alpha)
    return (w0 * z0.double() + w1 * z1.double()).to(z0.dtype)
