"""Sample grids: a batch of images in [-1, 1] tiled into one uint8 picture (for W&B, PNG files, the CLI)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dtrain.data.images import tile

__all__ = ["image_grid", "save_grid"]


def image_grid(x: Tensor, nrow: int | None = None, pad: int = 1, upscale: int = 1) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> uint8 [rows * (H + pad) + pad, cols * (W + pad) + pad(, 3)], black borders.

    ``nrow``: images per row (default: about square); ``upscale``: nearest-neighbour zoom (8x8 digits).
    One channel gives a 2-D grayscale array, three an RGB array.
    """
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"image_grid: need [N, 1 or 3, H, W] images, got {list(x.shape)}")
    if upscale > 1:
        x = x.repeat_interleave(upscale, 2).repeat_interleave(upscale, 3)
    u8 = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return tile(u8, nrow, pad)


def save_grid(x: Tensor, path: str | Path, nrow: int | None = None, upscale: int = 1) -> Path:
    """Write ``image_grid(x)`` as a PNG."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(x, nrow, upscale=upscale)).save(path)
    return path
