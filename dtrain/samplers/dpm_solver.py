"""DPM-Solver++ multistep, orders 1-3, in data-prediction form (Lu et al. 2022, arXiv 2211.01095).

Over lambda = log(alpha / sigma) with h = lambda_s - lambda_t, from the last few x0 predictions D:
  x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - e^{-h}) D_0 + higher-order corrections.
Order 1 is DDIM. Early steps use lower orders until enough history exists; a step landing on t = 0
(lambda = +inf) is first order, and with fewer than 15 steps the one before it is at most second
order (``lower_order_final``, as in the reference implementation).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from dtrain.diffusion.denoiser import DenoiserLike
from dtrain.samplers.base import Callback, on_grid

__all__ = ["dpm_solver_pp"]


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
