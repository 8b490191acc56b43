"""Sampler grids (float64) and training-time sampling.

A grid is a strictly decreasing float64 tensor t_0 = t_max > ... > t_{n-1} >= t_min > t_n = 0 of a
schedule's time; its n steps are the pairs (t_i, t_{i+1}) and the last one lands on clean data.

Spacings:
- ``uniform``, ``quadratic`` in t; ``lambda``: uniform in log-SNR (DPM-Solver, arXiv 2206.00927);
- ``rho``: Karras et al.'s sigma^(1/rho) grid in sigma / alpha (arXiv 2206.00364, eq. 5), rho = 7;
- ``geometric``: uniform in log(sigma / alpha) (VE);
- for discrete (DDPM) schedules: ``leading``, ``trailing`` and ``linspace`` index spacings
  (Lin et al. 2023, arXiv 2305.08891, Table 2) and any user-given index subsequence (respacing,
  Nichol & Dhariwal 2021, arXiv 2102.09672).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from dtrain.diffusion.schedule import Schedule

__all__ = [
    "SPACINGS",
    "TIME_SAMPLERS",
    "TIME_SAMPLER_PARAMS",
    "make_grid",
    "rho_times",
    "grid_from_indices",
    "default_spacing",
    "check_grid",
    "sample_t",
]

SPACINGS = ("uniform", "quadratic", "lambda", "rho", "geometric", "leading", "trailing", "linspace")
DISCRETE_SPACINGS = ("leading", "trailing", "linspace")


def default_spacing(schedule: Schedule) -> str:
    """The spacing a sampler uses when none is given."""
    if schedule.discrete_steps:
        return "trailing"
    return {"edm": "rho", "ve": "geometric", "flow": "uniform"}.get(schedule.name, "lambda")


def _with_zero(ts: Tensor) -> Tensor:
    return torch.cat([ts.to(torch.float64), torch.zeros(1, dtype=torch.float64)])


def grid_from_indices(schedule: Schedule, indices: Sequence[int] | Tensor) -> Tensor:
    """Grid through DDPM indices (any subsequence of 0..T-1, in any order); index i is t = (i + 1) / T."""
    T = schedule.discrete_steps
    if not T:
        raise ValueError(f"grid: index subsequences need a discrete schedule, not {schedule.name!r}")
    raw = torch.as_tensor(indices)
    if raw.ndim > 1 or (raw.numel() and (raw.dtype == torch.bool or not bool((raw == raw.round()).all()))):
        raise ValueError(f"grid: indices must be a flat sequence of ints, got {raw.tolist()[:8]}...")
    idx = raw.to(torch.long).flatten()
    if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= T:
        raise ValueError(f"grid: indices must lie in [0, {T - 1}], got {idx.tolist()[:8]}...")
    idx = torch.unique(idx).flip(0)  # strictly decreasing
    return _with_zero((idx.to(torch.float64) + 1) / T)


def _discrete_indices(T: int, n: int, spacing: str, offset: int = 0) -> Tensor:
    """Decreasing DDPM indices of a spacing, in numpy's float arithmetic as diffusers computes them.

    Exact ties (x.5) round the way numpy's ``arange``/``linspace`` values fall, so the indices equal
    diffusers' ``set_timesteps`` for every n. ``np.arange`` yields a stray (n+1)-th point near 0 for
    some n (T = 1000: n = 61, 103, ...; diffusers then steps through index -1); it is dropped here.
    """
    if spacing == "leading":
        idx = np.arange(n)[::-1] * (T // n) + offset
    elif spacing == "trailing":
        idx = (np.round(np.arange(T, 0, -T / n)) - 1)[:n]
    else:  # linspace
        idx = np.linspace(0, T - 1, n).round()[::-1]
    return torch.from_numpy(idx.astype(np.int64))


def make_grid(
    schedule: Schedule,
    n: int,
    spacing: str | None = None,
    *,
    t_max: float | None = None,
    t_min: float | None = None,
    rho: float = 7.0,
    offset: int = 0,
) -> Tensor:
    """A grid of ``n`` steps (n + 1 points, the last 0) for ``schedule``."""
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 1:
        raise ValueError(f"grid: number of steps must be a positive int, got {n!r}")
    n = int(n)
    spacing = spacing or default_spacing(schedule)
    if spacing not in SPACINGS:
        raise ValueError(f"grid.spacing: unknown spacing {spacing!r}; choose one of {list(SPACINGS)}")
    if spacing == "rho" and not rho > 0:
        raise ValueError(f"grid.rho: must be > 0, got {rho}")
    T = schedule.discrete_steps
    if spacing in DISCRETE_SPACINGS:
        if not T:
            raise ValueError(f"grid.spacing: {spacing!r} needs a discrete schedule, not {schedule.name!r}")
        if n > T:
            raise ValueError(f"grid: {n} steps exceed the schedule's {T} training steps")
        if t_max is not None or t_min is not None:
            raise ValueError(f"grid.t_max / t_min: spacing {spacing!r} places DDPM indices over all {T} steps; for a "
                             f"partial grid use a continuous spacing (uniform, lambda, ...) or grid_from_indices")
        if n == 1 and spacing in ("leading", "linspace"):
            warnings.warn(f"grid: one step with spacing {spacing!r} evaluates only near t = 0 (training index "
                          f"{offset}), so the sample stays noise; 'trailing' starts at t_max", stacklevel=2)
        return grid_from_indices(schedule, _discrete_indices(T, n, spacing, offset))
    hi = float(schedule.t_max if t_max is None else t_max)
    lo = float(schedule.t_min if t_min is None else t_min)
    if not 0 <= lo < hi:
        raise ValueError(f"grid: need 0 <= t_min < t_max, got t_min={lo}, t_max={hi}")
    if lo == 0 and spacing not in ("uniform", "quadratic"):
        raise ValueError(f"grid.spacing: {spacing!r} needs t_min > 0 (log-SNR is infinite at t = 0)")
    m = n + 1 if lo == 0 else n  # with t_min = 0 the grid's own last point is the clean end
    u = torch.linspace(0, 1, m, dtype=torch.float64) if m > 1 else torch.zeros(1, dtype=torch.float64)
    if spacing == "uniform":
        ts = hi + (lo - hi) * u
    elif spacing == "quadratic":
        ts = (math.sqrt(hi) + (math.sqrt(lo) - math.sqrt(hi)) * u) ** 2
    else:
        lam_hi, lam_lo = schedule.lambda_(lo), schedule.lambda_(hi)  # lambda decreases with t
        if not math.isfinite(float(lam_lo)):
            raise ValueError(f"grid.spacing: {spacing!r} needs alpha(t_max) > 0, but alpha({hi}) = 0 for "
                             f"{schedule.name!r} (log-SNR -inf); pass t_max < {hi} or use 'uniform'")
        if spacing in ("lambda", "geometric"):  # geometric in sigma / alpha is uniform in lambda
            lam = lam_lo + (lam_hi - lam_lo) * u
        else:  # rho: in s = sigma / alpha = exp(-lambda)
            lam = _rho_lambda(lam_lo, lam_hi, u, rho)
        ts = schedule.t_from_lambda(lam)
    ts[0], ts[-1] = hi, (lo if m > 1 else hi)  # exact ends despite rounding and the lambda round trip
    return ts if lo == 0 else _with_zero(ts)


def _rho_lambda(lam_lo: Tensor, lam_hi: Tensor, q: Tensor, rho: float) -> Tensor:
    """log-SNR at positions q in [0, 1] of Karras's s^(1/rho) scale, s = sigma / alpha = exp(-lambda), from
    lam_lo (q = 0, the noisy end) to lam_hi (q = 1)."""
    s_hi, s_lo = torch.exp(-lam_lo), torch.exp(-lam_hi)
    return -torch.log((s_hi ** (1 / rho) + q * (s_lo ** (1 / rho) - s_hi ** (1 / rho))) ** rho)


def rho_times(schedule: Schedule, q: Tensor, rho: float = 7.0) -> Tensor:
    """Times at positions ``q`` in [0, 1] (float64) of the ``rho`` grid's continuous scale: q = 0 is t_max, q = 1
    t_min, and q = i / (n - 1) the n points of ``make_grid(schedule, n, "rho")`` above 0 (EDM, arXiv 2206.00364,
    eq. 5). Uniform q is CTM's uniform draw of a grid index (arXiv 2310.02279) as the grid gets fine."""
    hi, lo = float(schedule.t_max), float(schedule.t_min)
    lam_lo, lam_hi = schedule.lambda_(hi), schedule.lambda_(lo)
    if lo <= 0 or not math.isfinite(float(lam_lo)):
        raise ValueError(f"method.time_sampling: 'rho' needs 0 < t_min and alpha(t_max) > 0 (a finite log-SNR), "
                         f"which {schedule.name!r} does not have; use 'uniform' or 'logit_normal'")
    ts = schedule.t_from_lambda(_rho_lambda(lam_lo, lam_hi, q.to(torch.float64), rho))
    return ts.clamp(lo, hi)


def check_grid(grid: Tensor) -> Tensor:
    """Validate a sampler grid; returns it as float64 on the CPU."""
    if not isinstance(grid, Tensor) or grid.ndim != 1 or grid.numel() < 2:
        raise ValueError("grid: must be a 1-D tensor of at least 2 times (t_max ... 0)")
    g = grid.detach().to("cpu", torch.float64)
    if not bool((g[1:] < g[:-1]).all()) or float(g[-1]) < 0:
        raise ValueError(f"grid: times must be strictly decreasing and >= 0, got {g.tolist()[:6]}...")
    return g


# ---------------------------------------------------------------------------------------------
# Training-time sampling

TIME_SAMPLERS = ("uniform_discrete", "uniform", "lognormal", "logit_normal")
# (p_mean, p_std) where a recipe leaves them unset: EDM's (arXiv 2206.00364) and SD3's (arXiv 2403.03206)
TIME_SAMPLER_PARAMS = {"lognormal": (-1.2, 1.2), "logit_normal": (0.0, 1.0)}


def sample_t(
    schedule: Schedule,
    n: int,
    kind: str = "uniform",
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    p_mean: float | None = None,
    p_std: float | None = None,
    t_min: float | None = None,
) -> Tensor:
    """Draw n training times (float64); unset ``p_mean`` / ``p_std`` take ``TIME_SAMPLER_PARAMS[kind]``.

    - ``uniform_discrete``: t = (i + 1) / T, i uniform in 0..T-1 (Ho et al. 2020);
    - ``uniform``: uniform in [t_min, t_max];
    - ``lognormal``: ln(sigma / alpha) ~ N(p_mean, p_std^2) (EDM, arXiv 2206.00364), clipped to the range;
    - ``logit_normal``: t = sigmoid(N(p_mean, p_std^2)) mapped into [t_min, t_max] (SD3, arXiv 2403.03206).
    """
    lo = float(schedule.t_min if t_min is None else t_min)
    hi = float(schedule.t_max)
    mean, std = TIME_SAMPLER_PARAMS.get(kind, (0.0, 1.0))
    p_mean, p_std = mean if p_mean is None else p_mean, std if p_std is None else p_std
    if kind == "uniform_discrete":
        T = schedule.discrete_steps
        if not T:
            raise ValueError(f"method.time_sampling: 'uniform_discrete' needs a discrete schedule, not {schedule.name}")
        i = torch.randint(0, T, (n,), generator=generator, device="cpu")
        return ((i.to(torch.float64) + 1) / T).to(device)
    u = torch.rand(n, generator=generator, dtype=torch.float64, device="cpu")
    if kind == "uniform":
        t = lo + (hi - lo) * u
    elif kind == "lognormal":
        z = torch.randn(n, generator=generator, dtype=torch.float64, device="cpu")
        t = schedule.t_from_lambda(-(p_mean + p_std * z)).clamp(lo, hi)
    elif kind == "logit_normal":
        z = torch.randn(n, generator=generator, dtype=torch.float64, device="cpu")
        t = lo + (hi - lo) * torch.sigmoid(p_mean + p_std * z)
    else:
        raise ValueError(f"method.time_sampling: unknown {kind!r}; choose one of {list(TIME_SAMPLERS)}")
    return t.to(device)
