"""Stateless samplers over a denoiser, shared by evaluation, the CLI and inference bundles.

``SAMPLERS`` maps a name to a ``SamplerSpec``; ``run`` builds the grid for a number of network
evaluations (NFE) and calls the function. Names: ddpm, ddpm_large, ddim, ddim_eta1, dpm++1m/2m/3m/3m_taylor,
dpm++2s, euler, heun, euler_maruyama
(few-step student samplers register themselves from ``few_step``).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dtrain.diffusion.denoiser import DenoiserLike
from dtrain.diffusion.timesteps import make_grid
from dtrain.errors import InputError, check_count
from dtrain.registry import Registry
from dtrain.samplers.base import Callback
from dtrain.samplers.ddim import ddim, ddim_invert, slerp
from dtrain.samplers.ddpm import ddpm, euler_maruyama
from dtrain.samplers.dpm_solver import dpm_solver_2s, dpm_solver_pp
from dtrain.samplers.heun import euler, heun

__all__ = [
    "SAMPLERS",
    "SamplerSpec",
    "run",
    "steps_for_nfe",
    "default_grid",
    "unmet",
    "supported",
    "check_sampler",
    "check_eta",
    "check_guidance_scale",
    "ddim",
    "ddim_invert",
    "slerp",
    "ddpm",
    "euler_maruyama",
    "dpm_solver_pp",
    "dpm_solver_2s",
    "euler",
    "heun",
]


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler function, its fixed options, how many network evaluations a grid of n steps costs, (optionally) its
    own default grid ``grid(schedule, n, spacing)`` (None: ``make_grid``), whether it is a few-step student's, and what
    it needs of the model beyond a denoiser's ``model(x, t, cond)``: ``needs`` = {method: what has it}."""

    fn: Callable[..., Tensor]
    opts: dict[str, Any] = field(default_factory=dict)
    nfe: Callable[[int], int] = lambda n: n
    steps: Callable[[int], int] = lambda nfe: nfe
    doc: str = ""
    grid: Callable[[Any, int, str | None], Tensor] | None = None
    few_step: bool = False  # a student's sampler (consistency, flow maps): not a solver that converges to the data
    # with a diffusion teacher as its steps grow (the sampler tests' convergence checks skip it)
    needs: dict[str, str] = field(default_factory=dict)  # e.g. {"jump": "a flow-map student (MeanFlow, CTM)"}


SAMPLERS: Registry[SamplerSpec] = Registry("sampler")
SAMPLERS.register("ddpm", SamplerSpec(ddpm, doc="DDPM ancestral, posterior variance"))
SAMPLERS.register("ddpm_large", SamplerSpec(ddpm, {"variance": "large"}, doc="DDPM ancestral, beta variance"))
SAMPLERS.register("ddim", SamplerSpec(ddim, doc="DDIM eta=0"))
SAMPLERS.register("ddim_eta1", SamplerSpec(ddim, {"eta": 1.0}, doc="DDIM eta=1"))
SAMPLERS.register("dpm++1m", SamplerSpec(dpm_solver_pp, {"order": 1}, doc="DPM-Solver++ first order"))
SAMPLERS.register("dpm++2m", SamplerSpec(dpm_solver_pp, {"order": 2}, doc="DPM-Solver++(2M)"))
SAMPLERS.register("dpm++3m", SamplerSpec(dpm_solver_pp, {"order": 3}, doc="DPM-Solver++(3M), as diffusers"))
SAMPLERS.register(
    "dpm++3m_taylor",
    SamplerSpec(dpm_solver_pp, {"order": 3, "taylor3": True}, doc="DPM-Solver++(3M), full Taylor D2 (third order)"),
)
SAMPLERS.register(
    "dpm++2s",
    SamplerSpec(dpm_solver_2s, nfe=lambda n: 2 * n - 1, steps=lambda nfe: (nfe + 1) // 2,
                doc="DPM-Solver++(2S), singlestep, 2n-1 NFE (2n-2 from alpha = 0: a flow or zero-SNR t_max)"),
)
SAMPLERS.register("euler", SamplerSpec(euler, doc="Euler on the probability-flow ODE"))
SAMPLERS.register("euler_maruyama", SamplerSpec(euler_maruyama, doc="Euler-Maruyama on the reverse SDE"))
SAMPLERS.register(
    "heun",
    SamplerSpec(heun, nfe=lambda n: 2 * n - 1, steps=lambda nfe: (nfe + 1) // 2, doc="Heun (EDM), 2n-1 NFE"),
)


def steps_for_nfe(name: str, nfe: int) -> int:
    """Grid steps a sampler takes for a budget of ``nfe`` network evaluations (>= 1)."""
    spec = SAMPLERS.get(name, "sampler")
    if not isinstance(nfe, numbers.Integral):  # counts only (check_count also takes integral floats)
        raise InputError(f"nfe: must be an int >= 1 (network evaluations per sample), got {nfe!r}")
    return max(1, spec.steps(check_count(nfe, "nfe", "network evaluations per sample")))


def default_grid(name: str, schedule: Any, nfe: int, spacing: str | None = None) -> Tensor:
    """The time grid sampler ``name`` runs for a budget of ``nfe`` evaluations: its own grid or ``make_grid``."""
    return (SAMPLERS.get(name, "sampler").grid or make_grid)(schedule, steps_for_nfe(name, nfe), spacing)


def unmet(name: str, model: Any) -> str | None:
    """What registered sampler ``name`` needs that ``model`` lacks (e.g. "a flow-map student (MeanFlow, CTM)"), or
    None when the model can run it."""
    return next((what for attr, what in SAMPLERS.get(name, "sampler").needs.items() if not hasattr(model, attr)), None)


def supported(model: Any) -> list[str]:
    """The registered samplers that can drive ``model``."""
    return [n for n in SAMPLERS.names() if unmet(n, model) is None]


def check_sampler(name: str, model: Any, key: str = "sampler", what: str | None = None) -> SamplerSpec:
    """The spec of sampler ``name`` if ``model`` can run it; else an ``InputError`` naming ``key`` (a flag or field)
    and the samplers this model runs. ``what``: how the message calls the model (default: its class)."""
    spec = SAMPLERS.get(name, key)
    need = unmet(name, model)
    if need is not None:
        what = what or f"this model ({type(model).__name__})"
        raise InputError(f"{key}: sampler {name!r} needs {need}; {what} is not one: choose one of {supported(model)}")
    return spec


def _takes_eta(name: str) -> bool:
    return "eta" in inspect.signature(SAMPLERS.get(name, "sampler").fn).parameters


def check_eta(name: str, eta: Any, key: str = "eta") -> float:
    """The DDIM noise level ``eta`` for sampler ``name``: a number in [0, 1] for a sampler that takes one; else an
    ``InputError`` naming ``key`` (the argument, a flag or field) and what is valid."""
    if not _takes_eta(name):
        raise InputError(f"{key}: sampler {name!r} takes no eta; samplers that do: "
                         f"{[n for n in SAMPLERS.names() if _takes_eta(n)]}")
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0 <= eta <= 1:
        raise InputError(f"{key}: must be a number in [0, 1] (0: deterministic, 1: ancestral), got {eta!r}")
    return float(eta)


def check_guidance_scale(w: Any, key: str = "w") -> float:
    """A classifier-free guidance scale: a finite number >= 0 (1: no guidance, 0: the unconditional model); else an
    ``InputError`` naming ``key`` (the argument, a flag or field)."""
    if isinstance(w, bool) or not isinstance(w, numbers.Real) or not (math.isfinite(w) and w >= 0):
        raise InputError(f"{key}: must be a number >= 0 (1: no guidance, 0: unconditional), got {w!r}")
    return float(w)


def run(
    name: str,
    denoiser: DenoiserLike,
    x_T: Tensor,
    nfe: int,
    *,
    cond: Any = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    spacing: str | None = None,
    grid: Tensor | None = None,
    **opts: Any,
) -> Tensor:
    """Sample with a registered sampler at a given NFE (or on an explicit grid). A half-precision ``x_T`` is
    integrated in float32 (the state sums many small steps: bf16 lost the sample at 1000 DDIM steps) and returned
    in its own dtype; the network runs in its own precision either way."""
    spec = SAMPLERS.get(name, "sampler")
    if grid is None:
        grid = default_grid(name, denoiser.schedule, nfe, spacing)
    x = x_T.float() if x_T.dtype in (torch.float16, torch.bfloat16) else x_T
    out = spec.fn(denoiser, x, grid, cond=cond, generator=generator, callback=callback, **{**spec.opts, **opts})
    return out.to(x_T.dtype)


from dtrain.samplers import few_step as _few_step  # noqa: E402,F401  (registers the few-step samplers)
