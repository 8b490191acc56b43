"""sklearn's 8x8 digits (shipped with sklearn: no download), the one split that training data, the FID-digits
classifier and its reference statistics all use."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from dtrain.errors import InputError

__all__ = ["digits_arrays"]


def digits_arrays(split: str = "train") -> tuple[Tensor, Tensor]:
    """Images [N, 1, 8, 8] in [-1, 1] (value / 8 - 1) and labels [N].

    ``train`` / ``test``: the stratified 75 / 25 split (1347 / 450, ``random_state=0``); ``all``: the 1797 images
    in sklearn's order.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test", "all"):
        raise InputError(f"digits split (data.split): must be train, test or all, got {split!r}")
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    y = torch.from_numpy(d.target.astype(np.int64))
    if split == "all":
        return x, y
    train, test = train_test_split(np.arange(len(y)), test_size=0.25, random_state=0, stratify=d.target)
    idx = torch.from_numpy(np.sort(train if split == "train" else test))
    return x[idx], y[idx]
