"""What every sampler shares: the step loop's bookkeeping, noise draws and the callback contract.

A sampler is ``sample(denoiser, x_T, grid, *, cond=None, generator=None, callback=None, **opts)``:
stateless, float64 coefficients, and ``callback(info)`` after each step with
``info = {"i": step, "t": t, "s": s, "x": x_s, "x0": x0_hat}`` (a flow-map student's jump has no clean estimate
of its own: ``x0`` is None but on the last step, to t = 0).

Coefficients are computed once per grid in float64 (one vectorised schedule call per quantity) and
enter the step loop as Python floats: a float multiplies a tensor exactly as a 0-d tensor of the
tensor's dtype does, without a host-side tensor per step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dtrain.diffusion.schedule import Schedule
from dtrain.diffusion.timesteps import check_grid
from dtrain.errors import InputError

Callback = Callable[[dict[str, Any]], None]

__all__ = ["Callback", "steps", "randn_like", "scalar", "on_grid", "prior_std", "initial_noise", "derive_seed",
           "check_device"]


def steps(grid: Tensor) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(i, t_i, t_{i+1}) over a validated grid, as float64 0-d tensors."""
    g = check_grid(grid)
    for i in range(g.numel() - 1):
        yield i, g[i], g[i + 1]


def on_grid(schedule: Schedule, grid: Tensor, *quantities: str) -> tuple[Tensor, list[list[float]]]:
    """The validated grid and, for each named schedule quantity (alpha, sigma, lambda_, alpha_dot,
    sigma_dot), its float64 values at every grid point as a list of Python floats."""
    g = check_grid(grid)
    if float(g[0]) > float(schedule.t_max) * (1 + 1e-12):
        raise ValueError(f"grid: times must lie in [0, t_max = {float(schedule.t_max)}] of the {schedule.name!r} "
                         f"schedule, got {float(g[0])}")
    return g, [getattr(schedule, q)(g).tolist() for q in quantities]


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like x, drawn from ``generator`` (on its device)."""
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed hashed from integers (numpy's SeedSequence: nearby parts give unrelated streams), e.g.
    (seed, rank, step, micro-batch) of a training step or (seed, stream, index) of an evaluation sample."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def prior_std(schedule: Schedule) -> float:
    """Standard deviation of the sampling prior x_T ~ N(0, sigma(t_max)^2 I) (the terminal marginal's, alpha -> 0)."""
    return float(schedule.sigma(schedule.t_max))


def initial_noise(schedule: Schedule, n: int, shape: Sequence[int], generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> Tensor:
    """x_T = sigma(t_max) z with z ~ N(0, I) [n, *shape] float32 drawn from ``generator`` (on its device), then moved
    to ``device``: the one draw that training-time sampling, bundles and the CLI share, so a seed means one image."""
    dev = generator.device if generator is not None else torch.device("cpu")
    z = torch.randn((n, *shape), generator=generator, device=dev, dtype=torch.float32)
    return (z * prior_std(schedule)).to(device or dev)


def scalar(v: Tensor | float, x: Tensor) -> Tensor:
    """A float64 coefficient as a 0-d tensor in x's dtype and device."""
    return torch.as_tensor(v, dtype=torch.float64).to(device=x.device, dtype=x.dtype)


def check_device(name: str, key: str = "device") -> torch.device:
    """The device a user named (``--device``), checked before anything loads: cpu, cuda, cuda:<index> (or mps) that
    this machine has; else an ``InputError`` naming ``key``."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise InputError(f"{key}: unknown device {name!r}; use cpu, cuda or cuda:<index>") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"{key}: {name!r}, but this machine has no usable CUDA GPU; use cpu")
        if dev.index is not None and dev.index >= count:
            raise InputError(f"{key}: {name!r}, but this machine has {count} CUDA GPU(s): cuda:0 .. cuda:{count - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"{key}: {name!r}, but MPS is not available here; use cpu")
    elif dev.type != "cpu":
        raise InputError(f"{key}: unsupported device {name!r}; use cpu, cuda or cuda:<index>")
    return dev
