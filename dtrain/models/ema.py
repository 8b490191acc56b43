"""Exponential moving averages of a network, several at once, kept in the checkpoint.

Two kinds, each a full copy of the network updated with ``torch._foreach_lerp_`` after optimizer steps:
- a fixed decay beta (tag ``"0_999"`` for 0.999), a plain copy until ``start_step``;
- EDM2's power-function EMA (Karras et al. 2023, arXiv 2312.02696, Sec. 3.1) given by its relative
  standard deviation sigma_rel (tag ``"std0_050"``): beta_t = (1 - 1/t)^(gamma + 1), which averages the
  weights with profile t^gamma, and sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)).
State-dict keys are ``<tag>.<param>`` (a LightningModule holding it as ``ema`` gives ``ema.0_999.conv.weight``).
The tensor lists an update reads are gathered once and reused while the network is the same object (walking a
module tree costs as much as the averaging itself on small networks); ``reset_cache()`` drops them, and moving or
casting the copies (``.to``, ``.float``) or the start of a fit (``EMAUpdate``) does so too.
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["EMA", "decay_tag", "std_tag", "ema_tags", "std_to_gamma", "gamma_to_std", "power_beta"]


def decay_tag(decay: float) -> str:
    return str(float(decay)).replace(".", "_")


def std_tag(std: float) -> str:
    return f"std{float(std):.3f}".replace(".", "_")


def ema_tags(decays: Sequence[float], stds: Sequence[float]) -> list[str]:
    """The copies' names (state-dict prefixes) of ``ema.decays`` then ``ema.stds``, in that order."""
    return [decay_tag(d) for d in decays] + [std_tag(s) for s in stds]


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
        if bad := [d for d in decays if not 0 < d < 1]:
            raise ValueError(f"ema.decays: each decay must be in (0, 1), got {bad[0]}")
        entries = [("ema.decays", d, ("decay", float(d))) for d in decays]
        entries += [("ema.stds", s, ("power", std_to_gamma(float(s)))) for s in stds]
        rates: dict[str, tuple[str, float]] = {}
        for tag, (key, v, rate) in zip(ema_tags(decays, stds), entries, strict=True):
            if tag in rates:  # the tag names the copy in checkpoints and bundles
                raise ValueError(f"{key}: {v} gives the copy name {tag!r} of another entry; drop one")
            rates[tag] = rate
        super().__init__()
        for tag in rates:  # submodules named by tag: state-dict keys "<tag>.<param>"
            self.add_module(tag, copy.deepcopy(net).requires_grad_(False).eval())
        self.rates, self.start_step, self.every = rates, start_step, max(1, every)
        self._cache: tuple[Any, list[Tensor], dict[str, list[Tensor]]] | None = None  # (weakref(net), src, dst)

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

    def reset_cache(self) -> None:
        """Forget the tensor lists of the last update (call after replacing tensors of ``net`` or of a copy)."""
        self._cache = None

    def _apply(self, fn: Any, recurse: bool = True) -> EMA:  # .to / .float / .cuda replace buffers
        self.reset_cache()
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles never carry the cache (nor its weakref)
        return {**super().__getstate__(), "_cache": None}

    def _lists(self, net: nn.Module) -> tuple[list[Tensor], dict[str, list[Tensor]]]:
        """(source tensors, target tensors per tag); cached for the default full-tensor lists only, since a
        sharded strategy's ``sources`` may build fresh tensors on every call (``dtrain.dist.strategy.zero_ema``)."""
        default = self.sources is EMA._tensors and self.targets is EMA._tensors
        if default and self._cache is not None and self._cache[0]() is net:
            return self._cache[1], self._cache[2]
        src, dst = self.sources(net), {tag: self.targets(self[tag]) for tag in self.rates}
        self._cache = (weakref.ref(net), src, dst) if default else None
        return src, dst

    @torch.no_grad()
    def update(self, net: nn.Module, step: int, beta: float | None = None) -> None:
        """Average ``net`` in after optimizer step ``step`` (1-based); skipped unless step % every == 0. ``beta``:
        this update's decay for every copy instead of their own (a schedule the caller owns; a plain copy up to
        ``start_step`` still)."""
        if step % self.every:
            return
        src, dsts = self._lists(net)
        first = next(iter(dsts.values()), None)
        if src and first and src[0].dtype != first[0].dtype:  # a half-precision net (16-true): average in float32
            src = [t.to(first[0].dtype) for t in src]
        for tag, dst in dsts.items():
            b = self.beta(tag, step) if beta is None or step <= self.start_step else beta
            if b == 0.0:  # a plain copy (up to ema.start_step, a power EMA's first step): tensor by tensor, as
                for d, t in zip(dst, src, strict=True):  # fsdp2's DTensors have no sharded foreach copy
                    d.copy_(t)
            else:
                torch._foreach_lerp_(dst, src, 1.0 - b)
