"""Residual MLP for low-dimensional data (the 2-D Gaussian mixture of the tests), called as net(x, c_noise, cond)
(flow maps with ``second_time``: net(x, c_noise, cond, c_noise_s))."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from dtrain.models.embeddings import ClassEmbedding, GuidanceEmbedding, TimeEmbedding, split_cond

__all__ = ["MLP"]


class Block(nn.Module):
    """LayerNorm -> Linear -> (+ embedding) SiLU -> Linear, added to the input."""

    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1, self.fc2 = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.emb = nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        return h + self.fc2(self.drop(F.silu(self.fc1(self.norm(h)) + self.emb(emb))))


class MLP(nn.Module):
    """x [B, dim] -> Linear -> ``depth`` residual blocks conditioned on time (and class, and w when ``w_cond``)
    -> Linear (zero init)."""

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 4, num_classes: int = 0, dropout: float = 0.0,
                 w_cond: bool = False, second_time: bool = False):
        super().__init__()
        self.dim, self.num_classes, self.w_cond = dim, num_classes, w_cond
        self.time_emb = TimeEmbedding(min(hidden, 128), hidden)
        # flow maps (MeanFlow u(z, r, t), CTM G(x, t, s)): the target time, embedded from 0 at initialisation
        self.s_emb = TimeEmbedding(min(hidden, 128), hidden, zero_init=True) if second_time else None
        self.class_emb = ClassEmbedding(num_classes, hidden) if num_classes > 0 else None
        self.w_emb = GuidanceEmbedding(min(hidden, 128), hidden) if w_cond else None  # guided distillation
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(Block(hidden, dropout) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Any = None, c_noise_s: Tensor | None = None) -> Tensor:
        """``c_noise_s``: the second time of a flow map (``second_time``); None means s = t."""
        labels, w = split_cond(cond, self.w_cond)
        emb = self.time_emb(c_noise)
        if self.s_emb is not None:
            emb = emb + self.s_emb(c_noise if c_noise_s is None else c_noise_s)
        if self.class_emb is not None:
            emb = emb + self.class_emb(labels, x.shape[0], x.device)
        if self.w_emb is not None:
            emb = emb + self.w_emb(w, x.shape[0], x.device)
        emb = F.silu(emb)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)
