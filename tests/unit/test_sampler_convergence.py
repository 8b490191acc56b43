"""Measured convergence order of the ODE samplers on the Gaussian probability-flow ODE.

For data N(mu, s^2) the PF-ODE has the closed-form flow
  x_u = a_u mu + sqrt(a_u^2 s^2 + sig_u^2) / sqrt(a_t^2 s^2 + sig_t^2) (x_t - a_t mu),
so the global error of a sampler at the grid's last time (t_min: the grid is cut before its jump to 0)
is known exactly. Halving the step size divides the error of an order-p method by 2^p; the test
measures log2 of that ratio over successive halvings.

DPM-Solver++(3M) as published in the reference code (and in diffusers and k-diffusion) weights the
second difference D2 = h^2 x0''/2 by half its Taylor coefficient; it is second order (ratio ~4).
``dpm++3m_taylor`` uses the full coefficient and is third order (ratio ~8, more on uniform-lambda grids).
"""

from __future__ import annotations

import math

import pytest
import torch

from dtrain.diffusion.schedule import make_schedule
from dtrain.diffusion.timesteps import make_grid
from dtrain.samplers import SAMPLERS

MU, SD = 0.7, 0.5


class Gauss(torch.nn.Module):
    """Exact denoiser of N(MU, SD^2): E[x0 | x_t] = mu + a s^2 / (a^2 s^2 + sigma^2) (x_t - a mu)."""

    def __init__(self, schedule) -> None:
        super().__init__()
        self.schedule = schedule

    def forward(self, x, t, cond=None):
        a, sg = self.schedule.alpha(t), self.schedule.sigma(t)
        return MU + a * SD**2 / (a**2 * SD**2 + sg**2) * (x - a * MU)


def flow(schedule, x, t, u):
    """The exact PF-ODE map x_t -> x_u."""
    a_t, s_t, a_u, s_u = (float(f(v)) for v in (t, u) for f in (schedule.alpha, schedule.sigma))
    return a_u * MU + math.sqrt(a_u**2 * SD**2 + s_u**2) / math.sqrt(a_t**2 * SD**2 + s_t**2) * (x - a_t * MU)


def measured_orders(name: str, key: str, spacing: str, ns: list[int], opts: dict | None = None,
                    **grid_kw) -> list[float]:
    s = make_schedule(key)
    spec = SAMPLERS.get(name)
    a_T, s_T = float(s.alpha(s.t_max)), float(s.sigma(s.t_max))
    x_T = a_T * MU + math.sqrt(a_T**2 * SD**2 + s_T**2) * torch.linspace(-3, 3, 9, dtype=torch.float64)[:, None]
    errs = []
    for n in ns:
        grid = make_grid(s, n, spacing, **grid_kw)[:-1]  # t_max ... t_min
        out = spec.fn(Gauss(s), x_T.clone(), grid, **{**spec.opts, **(opts or {})})
        errs.append(float((out - flow(s, x_T, grid[0], grid[-1])).abs().max()))
    return [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]


CASES = [
    # (sampler, schedule, spacing, order, step counts)
    ("ddim", "vp_linear", "lambda", 1, [32, 64, 128]),
    ("dpm++1m", "vp_linear", "lambda", 1, [32, 64, 128]),
    ("euler", "vp_linear", "lambda", 1, [64, 128, 256]),
    ("dpm++2m", "vp_linear", "lambda", 2, [32, 64, 128]),
    ("heun", "vp_linear", "lambda", 2, [32, 64, 128]),
    ("dpm++3m", "vp_linear", "lambda", 2, [64, 128, 256]),  # the reference 3M: second order
    ("dpm++3m_taylor", "vp_linear", "lambda", 3, [16, 32, 64]),
    ("dpm++2s", "vp_linear", "lambda", 2, [16, 32, 64]),  # singlestep: consistency distillation's teacher step
    ("ddim", "edm", "rho", 1, [32, 64, 128]),
    ("heun", "edm", "rho", 2, [32, 64, 128]),
    ("dpm++2m", "edm", "rho", 2, [64, 128, 256]),
    ("dpm++2s", "edm", "rho", 2, [32, 64, 128]),
    ("dpm++3m", "edm", "rho", 2, [128, 256, 512]),
    ("dpm++3m_taylor", "edm", "rho", 3, [64, 128, 256]),
    ("heun", "flow", "uniform", 2, [32, 64, 128]),
    ("dpm++2m", "flow", "uniform", 2, [64, 128, 256]),
]


@pytest.mark.parametrize(("name", "key", "spacing", "order", "ns"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_convergence_order(name, key, spacing, order, ns):
    kw = {"t_min": 1e-3} if key == "flow" else {}
    orders = measured_orders(name, key, spacing, ns, **kw)
    for p in orders:  # 2^p = error ratio per halving: ~2 (first order), ~4 (second), >= ~8 (third)
        assert p > order - 0.3, orders
        if order < 3:
            assert p < order + 0.45, orders


@pytest.mark.parametrize("r", [1 / 3, 0.7])
@pytest.mark.parametrize("key", ["vp_linear", "edm"])
def test_dpm_solver_2s_is_second_order_at_any_midpoint(key, r):
    """DPM-Solver++(2S) with its intermediate point at the fraction r of the step in lambda (arXiv 2211.01095,
    Alg. 1); r = 1/2, the default, hides a wrong fraction (1 - r) or a wrong weight (2 r for 1 / (2 r))."""
    spacing, ns = ("lambda", [16, 32, 64]) if key == "vp_linear" else ("rho", [32, 64, 128])
    orders = measured_orders("dpm++2s", key, spacing, ns, {"r": r})
    assert all(1.7 < p < 2.45 for p in orders), orders


def test_heun_converges_on_the_discrete_ddpm_schedule():
    """DDPM's alpha is piecewise linear in t with knots at i / T, and every point of a trailing grid is one: a step
    down from t must take the slope of the segment under t, its corrector at s the one above s. With the upper
    segment at both ends Heun stalled at ~3e-3 from 100 to 999 steps; measured now 3.7e-4 (100), 2.4e-6 (500)."""
    s = make_schedule("vp_discrete")
    a_T, s_T = float(s.alpha(s.t_max)), float(s.sigma(s.t_max))
    x_T = a_T * MU + math.sqrt(a_T**2 * SD**2 + s_T**2) * torch.linspace(-3, 3, 9, dtype=torch.float64)[:, None]
    errs = []
    for n in (100, 500):
        grid = make_grid(s, n, "trailing")[:-1]
        out = SAMPLERS.get("heun").fn(Gauss(s), x_T.clone(), grid)
        errs.append(float((out - flow(s, x_T, grid[0], grid[-1])).abs().max()))
    assert errs[1] < errs[0] / 50 and errs[1] < 1e-5, errs
    t = torch.tensor([0.5, 0.5 + 0.3 / s.T], dtype=torch.float64)  # a knot, and inside the segment above it
    knots = s.knots
    assert torch.allclose(s.alpha_dot_below(t)[0], (knots[500] - knots[499]) * s.T)
    assert torch.allclose(s.alpha_dot(t)[0], (knots[501] - knots[500]) * s.T)
    assert torch.equal(s.alpha_dot(t)[1], s.alpha_dot_below(t)[1])
    assert torch.equal(s.sigma_dot(t)[1], s.sigma_dot_below(t)[1])
    cos = make_schedule("vp_cosine")  # smooth schedules: one derivative
    assert torch.equal(cos.alpha_dot_below(t), cos.alpha_dot(t))
    assert torch.equal(cos.sigma_dot_below(t), cos.sigma_dot(t))
