"""Classifier-free guidance as a denoiser wrapper (Ho & Salimans 2022, arXiv 2207.12598).

D_w = D(x, t, null) + w (D(x, t, cond) - D(x, t, null)): w = 1 is the plain conditional model,
w = 0 the unconditional one (diffusers' ``guidance_scale`` convention). Guidance in x0 equals
guidance in eps at fixed x_t, so every sampler works with it unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dtrain.diffusion.denoiser import DenoiserLike

__all__ = ["CFGDenoiser"]


class CFGDenoiser(nn.Module):
    """Guided denoiser; ``cond`` must be a LongTensor of labels and ``null_label`` the dropped class."""

    def __init__(self, denoiser: DenoiserLike, scale: float, null_label: int) -> None:
        super().__init__()
        self.inner, self.scale, self.null_label = denoiser, float(scale), int(null_label)

    @property
    def schedule(self):
        return self.inner.schedule

    def forward(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Tensor:
        if cond is None or self.scale == 1.0:
            return self.inner(x, t, cond)
        null = torch.full_like(cond, self.null_label)
        tb = t if not isinstance(t, Tensor) or t.ndim == 0 else torch.cat([t, t])
        both = self.inner(torch.cat([x, x]), tb, torch.cat([cond, null]))
        d_c, d_u = both.chunk(2)
        return d_u + self.scale * (d_c - d_u)
