"""DPM-Solver++ multistep, orders 1-3, in data-prediction form (Lu et al. 2022, arXiv 2211.01095).

Over lambda = log(alpha / sigma) with h = lambda_s - lambda_t, from the last few x0 predictions D:
  x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - e^{-h}) D_0 + higher-order corrections.
Order 1 is DDIM. Early steps use lower orders until enough history exists; a step landing on t = 0
(lambda = +inf) is first order, and with fewer than 15 steps the one before it is at most second
order (``lower_order_final``, as diffusers' DPMSolverMultistepScheduler; the reference code's threshold is 10).

DPM-Solver++(2S) (``dpm_solver_2s_step``, the singlestep form, Alg. 1 of arXiv 2211.01095) needs no history: a
DDIM step to the log-SNR point u = t_lambda(lambda_t + r h), then
  x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - e^{-h}) ((1 - 1/(2r)) D(x_t, t) + 1/(2r) D(x_u, u)),
two evaluations per step and second order; one step between two times is what consistency distillation's
teacher takes (``dtrain.methods.consistency``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from dtrain.diffusion.denoiser import DenoiserLike
from dtrain.diffusion.schedule import bcast
from dtrain.samplers.base import Callback, on_grid
from dtrain.samplers.ddim import ddim_coeffs, ddim_step

__all__ = ["dpm_solver_pp", "dpm_solver_2s", "dpm_solver_2s_step"]


@torch.no_grad()
def dpm_solver_pp(
    denoiser: DenoiserLike,
    x: Tensor,
    grid: Tensor,
    *,
    cond: Any = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    order: int = 2,
    lower_order_final: bool = True,
    taylor3: bool = False,
) -> Tensor:
    """DPM-Solver++(``order``M): one network evaluation per step.

    ``taylor3`` (order 3 only) weights the second difference D2 = h^2 x0''/2 with its Taylor
    coefficient, 2 alpha_s (h^2/2 - h + 1 - e^{-h}) / h^2, which makes the method third order. The
    default (False) uses half of it, as the reference implementation, diffusers and k-diffusion do;
    that variant converges at second order (tests/unit/test_sampler_convergence.py measures both).
    """
    if order not in (1, 2, 3):
        raise ValueError(f"dpm_solver_pp: order must be 1, 2 or 3, got {order}")
    sch = denoiser.schedule
    g, (a, sg, lam) = on_grid(sch, grid, "alpha", "sigma", "lambda_")
    n = len(a) - 1
    hist: list[tuple[Tensor, float]] = []  # (x0_hat, lambda) of earlier steps, newest last
    for i in range(n):
        t, s = g[i], g[i + 1]
        x0 = denoiser(x, t, cond)
        lam_t, lam_s = lam[i], lam[i + 1]
        h = lam_s - lam_t
        a_s, s_s, s_t = a[i + 1], sg[i + 1], sg[i]
        emh = a[i] * s_s / (s_t * a_s)  # e^{-h} = (alpha_t sigma_s) / (sigma_t alpha_s): finite at both ends
        usable = 0  # history entries at finite lambda (t_max can sit at lambda = -inf)
        for _, lam_h in reversed(hist):
            if not math.isfinite(lam_h):
                break
            usable += 1
        k = min(order, usable + 1) if math.isfinite(lam_t) else 1
        if s == 0 or (lower_order_final and n < 15 and i == n - 1):
            k = 1
        elif lower_order_final and n < 15 and i == n - 2:
            k = min(k, 2)
        phi1 = 1 - emh  # = -(e^{-h} - 1)
        d = x0
        if k >= 2:
            m1, lam1 = hist[-1]
            r0 = (lam_t - lam1) / h
            d1_0 = (x0 - m1) / r0
            if k == 2:
                d = x0 + 0.5 * d1_0
            else:
                m2, lam2 = hist[-2]
                r1 = (lam1 - lam2) / h
                d1_1 = (m1 - m2) / r1
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi2 = phi1 / h - 1  # (1 - e^{-h}) / h - 1
                phi3 = (phi2 / h + 0.5) * (2 if taylor3 else 1)  # ((1 - e^{-h}) / h - 1) / h + 1/2
                x = (s_s / s_t) * x + (a_s * phi1) * x0 - (a_s * phi2) * d1 + (a_s * phi3) * d2
        if k < 3:
            x = (s_s / s_t) * x + (a_s * phi1) * d
        hist.append((x0, lam_t))
        del hist[:-2]
        if callback is not None:
            callback({"i": i, "t": t, "s": s, "x": x, "x0": x0})
    return x


def dpm_solver_2s_step(
    denoiser: DenoiserLike, x: Tensor, t: Tensor, s: Tensor, cond: Any = None, r: float = 0.5
) -> tuple[Tensor, Tensor]:
    """One DPM-Solver++(2S) step t -> s < t (see the module docstring); returns (x_s, D(x_t, t)).

    t, s: 0-d times or per-sample float64 [B] times (consistency distillation). Where lambda_t or lambda_s is not
    finite (t at zero terminal SNR, s = 0) the step is DDIM's: with 0-d times it then costs one evaluation.
    """
    if not 0.0 < r < 1.0:
        raise ValueError(f"dpm_solver_2s: r must be in (0, 1), got {r}")
    sch = denoiser.schedule
    lam_t, lam_s = sch.lambda_(t), sch.lambda_(s)
    ok = torch.isfinite(lam_t) & torch.isfinite(lam_s)
    x0_t = denoiser(x, t, cond)
    p, q, _ = ddim_coeffs(sch, t, s)
    if not bool(ok.any()):
        return bcast(p, x) * x + bcast(q, x) * x0_t, x0_t
    lam_u = torch.where(ok, lam_t + r * (lam_s - lam_t), torch.zeros_like(lam_t))
    u = torch.where(ok, sch.t_from_lambda(lam_u).to(t.device), t)  # u = t where not ok: x_u = x_t, D_u = D_t
    x_u = ddim_step(sch, x, x0_t, t, u)
    d = x0_t + (denoiser(x_u, u, cond) - x0_t) * (1.0 / (2.0 * r))
    if not bool(ok.all()):
        d = torch.where(ok.to(x.device).reshape(-1, *[1] * (x.ndim - 1)), d, x0_t)
    return bcast(p, x) * x + bcast(q, x) * d, x0_t


@torch.no_grad()
def dpm_solver_2s(
    denoiser: DenoiserLike,
    x: Tensor,
    grid: Tensor,
    *,
    cond: Any = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    r: float = 0.5,
) -> Tensor:
    """DPM-Solver++(2S) down the grid: two evaluations per step, one for a step that lands on t = 0 and one for a
    step from alpha = 0 (flow's or a zero-terminal-SNR t_max: lambda = -inf, the step is DDIM's), so 2n - 2 there
    where the registry counts 2n - 1."""
    g, _ = on_grid(denoiser.schedule, grid)
    for i in range(len(g) - 1):
        t, s = g[i], g[i + 1]
        x, x0 = dpm_solver_2s_step(denoiser, x, t, s, cond, r)
        if callback is not None:
            callback({"i": i, "t": t, "s": s, "x": x, "x0": x0})
    return x
