"""Image layout shared by the evaluation grids (``dtrain.eval.grids``) and ``dtrain sample --out grid.png``."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["tile"]


def tile(u8: Tensor, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """uint8 images [N, C, H, W] -> one uint8 picture [rows * (H + pad) + pad, cols * (W + pad) + pad(, C)] with black
    borders; ``nrow`` images per row (default: about square). One channel gives a 2-D array."""
    if u8.ndim != 4 or u8.dtype != torch.uint8:
        raise ValueError(f"tile: need uint8 images [N, C, H, W], got {u8.dtype} {list(u8.shape)}")
    n, c, h, w = u8.shape
    cols = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    out = torch.zeros(c, rows * (h + pad) + pad, cols * (w + pad) + pad, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        out[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = u8[i]
    arr = out.permute(1, 2, 0).cpu().numpy()
    return arr[..., 0] if c == 1 else arr
