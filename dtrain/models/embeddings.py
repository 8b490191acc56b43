"""Conditioning embeddings: sinusoidal time features (Vaswani et al. 2017, arXiv 1706.03762, as used by
DDPM, arXiv 2006.11239), class labels with a null class for classifier-free guidance (arXiv 2207.12598), and
the guidance scale w of guided-distillation students (Meng et al. 2023, arXiv 2210.03142; ``model.w_cond``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from dtrain.diffusion.guidance import GuidedCond

__all__ = ["sinusoidal", "TimeEmbedding", "ClassEmbedding", "GuidanceEmbedding", "split_cond"]


def sinusoidal(c_noise: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """[B] float -> [B, dim] features [cos(c w_k), sin(c w_k)], w_k = max_period^(-k / (dim / 2))."""
    if dim % 2:
        raise ValueError(f"sinusoidal embedding: dim must be even, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) / half * torch.arange(half, device=c_noise.device, dtype=torch.float32))
    args = c_noise.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class TimeEmbedding(nn.Module):
    """c_noise [B] -> sinusoidal(base) -> Linear -> SiLU -> Linear -> [B, dim]; ``zero_init``: the last layer starts
    at 0 (an embedding added to a pretrained network's, e.g. a flow map's second time, starts as a no-op)."""

    def __init__(self, base: int, dim: int, zero_init: bool = False) -> None:
        super().__init__()
        self.base = base
        self.mlp = nn.Sequential(nn.Linear(base, dim), nn.SiLU(), nn.Linear(dim, dim))
        if zero_init:
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, c_noise: Tensor) -> Tensor:
        return self.mlp(sinusoidal(c_noise, self.base).to(self.mlp[0].weight.dtype))


class ClassEmbedding(nn.Module):
    """Labels in [0, num_classes] -> [B, dim]; label ``num_classes`` (and ``cond=None``) is the null class."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, cond: Tensor | None, batch: int, device: torch.device) -> Tensor:
        if cond is None:
            cond = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        return self.table(cond.long())


class GuidanceEmbedding(nn.Module):
    """Guidance scale w [B] -> ``TimeEmbedding`` of ``scale`` w, its last layer zero-initialised: the embedding starts
    at 0, so a student built from a teacher without it computes the teacher's function for every w."""

    def __init__(self, base: int, dim: int, scale: float = 100.0) -> None:
        super().__init__()
        self.scale = scale
        self.emb = TimeEmbedding(base, dim)
        nn.init.zeros_(self.emb.mlp[-1].weight)
        nn.init.zeros_(self.emb.mlp[-1].bias)

    def forward(self, w: Tensor | None, batch: int, device: torch.device) -> Tensor:
        """w = None means 1 (no guidance)."""
        if w is None:
            w = torch.ones(batch, device=device)
        return self.emb(w.float().expand(batch) * self.scale)


def split_cond(cond: Any, w_cond: bool) -> tuple[Tensor | None, Tensor | None]:
    """(labels, w) of a network's ``cond``: labels or None, or ``GuidedCond(labels, w)`` for w-conditioned nets."""
    if isinstance(cond, GuidedCond):
        if not w_cond:
            raise ValueError("model: got a guidance scale w (GuidedCond) but the network has no w input "
                             "(model.w_cond: false)")
        return cond.labels, cond.w
    return cond, None
