"""Exponential moving averages of a network, several at once, kept in the checkpoint.

Two kinds, each a full copy of the network updated with ``torch._foreach_lerp_`` after optimizer steps:
- a fixed decay beta (tag ``"0_999"`` for 0.999), a plain copy until ``start_step``;
- EDM2's power-function EMA (Karras et al. 2023, arXiv 2312.02696, Sec. 3.1) given by its relative
  standard deviation sigma_rel (tag ``"std0_050"``): beta_t = (1 - 1/t)^(gamma + 1), which averages the
  weights with profile t^gamma, and sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)).
State-dict keys are ``<tag>.<param>`` (a LightningModule holding it as ``ema`` gives ``ema.0_999.conv.weight``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["EMA", "decay_tag", "std_tag", "std_to_gamma", "gamma_to_std", "power_beta"]


def decay_tag(decay: float) -> str:
    return str(float(decay)).replace(".", "_")


def std_tag(std: float) -> str:
    return f"std{float(std):.3f}".replace(".", "_")


def gamma_to_std(gamma: float) -> float:
    """sigma_rel of the power profile t^gamma (arXiv 2312.02696, eq. 3)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def std_to_gamma(std: float) -> float:
    """Inverse of ``gamma_to_std``: the real root of gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + 12 - s^-2 = 0."""
    if not 0 < std < gamma_to_std(0.0):
        raise ValueError(f"ema.stds: sigma_rel must be in (0, {gamma_to_std(0.0):.4f}) (gamma > 0), got {std}")
    r = 1.0 / std**2
    roots = np.roots([1.0, 7.0, 16.0 - r, 12.0 - r])
    return float(max(z.real for z in roots if abs(z.imag) < 1e-9))


def power_beta(gamma: float, step: int, every: int = 1) -> float:
    """EDM2's beta at optimizer step ``step`` (>= 1) for updates every ``every`` steps: (1 - every/step)^(gamma+1)."""
    return max(0.0, 1.0 - every / step) ** (gamma + 1)


class EMA(nn.Module):
    """Copies of ``net`` averaged with fixed ``decays`` and power-function ``stds``; always in eval mode."""

    def __init__(
        self, net: nn.Module, decays: Sequence[float] = (0.999,), stds: Sequence[float] = (),
        start_step: int = 0, every: int = 1,
    ) -> None:
        rates: dict[str, tuple[str, float]] = {}
        for d in decays:
            if not 0 < d < 1:
                raise ValueError(f"ema.decays: each decay must be in (0, 1), got {d}")
            rates[decay_tag(d)] = ("decay", float(d))
        for s in stds:
            rates[std_tag(s)] = ("power", std_to_gamma(float(s)))
        super().__init__()
        for tag in rates:  # submodules named by tag: state-dict keys "<tag>.<param>"
            self.add_module(tag, copy.deepcopy(net).requires_grad_(False).eval())
        self.rates, self.start_step, self.every = rates, start_step, max(1, every)

    def __getitem__(self, tag: str) -> nn.Module:
        if tag not in self.rates:
            raise KeyError(f"ema: no copy {tag!r}; have {self.tags}")
        return self._modules[tag]  # type: ignore[return-value]

    @property
    def tags(self) -> list[str]:
        return list(self.rates)

    def train(self, mode: bool = True) -> EMA:  # averaged weights never train (no dropout)
        return super().train(False)

    def beta(self, tag: str, step: int) -> float:
        kind, v = self.rates[tag]
        if kind == "power":
            return power_beta(v, step, self.every)
        return 0.0 if step <= self.start_step else v**self.every

    @staticmethod
    def _tensors(net: nn.Module) -> list[Tensor]:
        return [t for t in (*net.parameters(), *net.buffers()) if t.is_floating_point()]

    # What an update reads from the trained network and writes into each copy: the full tensors here; a
    # sharded strategy replaces both on the instance with each rank's shards (``dtrain.dist.strategy``).
    sources = _tensors
    targets = _tensors

    @torch.no_grad()
    def update(self, net: nn.Module, step: int) -> None:
        """Average ``net`` in after optimizer step ``step`` (1-based); skipped unless step % every == 0."""
        if step % self.every:
            return
        src = self.sources(net)
        for tag in self.rates:
            dst = self.targets(self[tag])
            b = self.beta(tag, step)
            if b == 0.0:
                torch._foreach_copy_(dst, src)
            else:
                torch._foreach_lerp_(dst, src, 1.0 - b)
