"""In-memory datasets made locally (no download): sklearn's digits, 32x32 photo patches, the 2-D GMM.

Batches are dicts {"x": float [B, C, H, W] (or [B, D]) in about [-1, 1], "y": LongTensor [B] when labelled}.
``InMemoryBatches`` streams whole batches from tensors (one gather per batch, no per-sample collate):
an endless sequence of seeded epochs, each a fresh permutation split by (rank, worker), so every rank
sees disjoint samples and the same seed replays the same stream. A resumed run starts the stream at
global_step x accumulate_grad_batches, where the interrupted run stopped.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dtrain.data import worker_init
from dtrain.data.digits import digits_arrays
from dtrain.data.synthetic import default_gmm
from dtrain.errors import InputError

__all__ = ["InMemoryBatches", "InMemoryDataModule", "digits_arrays", "photo_patches", "digits", "gmm", "patches"]


def photo_patches(n: int, size: int = 32, seed: int = 0) -> Tensor:
    """n random size x size RGB crops of sklearn's two sample photos, [n, 3, size, size] in [-1, 1]."""
    from sklearn.datasets import load_sample_images

    imgs = [torch.from_numpy(np.asarray(im)).permute(2, 0, 1) for im in load_sample_images().images]
    g = torch.Generator().manual_seed(seed)
    which = torch.randint(0, len(imgs), (n,), generator=g)
    out = torch.empty(n, 3, size, size, dtype=torch.uint8)
    for i in range(n):
        im = imgs[int(which[i])]
        top = int(torch.randint(0, im.shape[1] - size + 1, (1,), generator=g))
        left = int(torch.randint(0, im.shape[2] - size + 1, (1,), generator=g))
        out[i] = im[:, top : top + size, left : left + size]
    return out.float() / 127.5 - 1.0


class InMemoryBatches(IterableDataset):
    """Endless batches from in-memory tensors; see the module docstring for the order and the split."""

    def __init__(
        self, tensors: dict[str, Tensor], batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
        flip: bool = False, start_batch: int = 0,
    ) -> None:
        super().__init__()
        n = len(next(iter(tensors.values())))
        per_rank = n // world_size
        if per_rank < batch_size:
            raise InputError(f"data.batch_size: {batch_size} exceeds the {per_rank} samples each of "
                             f"{world_size} rank(s) holds ({n} in all)")
        self.tensors, self.batch_size, self.seed = tensors, batch_size, seed
        self.rank, self.world_size, self.flip, self.start_batch = rank, world_size, flip, start_batch

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        n = len(next(iter(self.tensors.values())))
        per_rank = n // self.world_size  # equal counts on every rank (no uneven-epoch hangs under DDP)
        per_epoch = per_rank // self.batch_size
        epoch, first = divmod(self.start_batch, per_epoch)
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(n, generator=g)[self.rank * per_rank : (self.rank + 1) * per_rank]
            for i in range(first, per_epoch):
                b = epoch * per_epoch + i
                if (b - self.start_batch) % workers != worker:  # the DataLoader polls worker 0 first, also on resume
                    continue
                idx = perm[i * self.batch_size : (i + 1) * self.batch_size]
                batch = {k: v[idx] for k, v in self.tensors.items()}
                if self.flip:
                    fg = torch.Generator().manual_seed(self.seed * 1_000_003 + b * 7919 + self.rank)
                    mask = torch.rand(len(idx), generator=fg) < 0.5
                    batch["x"] = torch.where(mask[:, None, None, None], batch["x"].flip(-1), batch["x"])
                yield batch
            epoch, first = epoch + 1, 0


class InMemoryDataModule(L.LightningDataModule):
    """A LightningDataModule over ``InMemoryBatches``; rank and world size come from the trainer."""

    def __init__(self, tensors: dict[str, Tensor], batch_size: int, *, seed: int = 0, flip: bool = False,
                 num_workers: int = 0, num_classes: int = 0) -> None:
        super().__init__()
        self.tensors, self.batch_size, self.seed, self.flip = tensors, batch_size, seed, flip
        self.num_workers, self.num_classes = num_workers, num_classes
        self.saved_world_size: int | None = None  # the checkpoint's, on resume

    def state_dict(self) -> dict[str, Any]:
        return {"world_size": self.trainer.world_size if self.trainer is not None else 1}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saved_world_size = state.get("world_size")

    def train_dataloader(self) -> DataLoader:
        rank, world, start = 0, 1, 0
        if self.trainer is not None:  # resumed: continue after the batches already trained on
            rank, world = self.trainer.global_rank, self.trainer.world_size
            start = self.trainer.global_step * self.trainer.accumulate_grad_batches
        if start and self.saved_world_size not in (None, world):
            warnings.warn(f"resume: in-memory data was split over {self.saved_world_size} rank(s), now {world}: each "
                          f"rank restarts after {start} batches of its new share, so this epoch repeats some samples "
                          f"and skips others", stacklevel=2)
        data = InMemoryBatches(self.tensors, self.batch_size, seed=self.seed, rank=rank, world_size=world,
                               flip=self.flip, start_batch=start)
        return DataLoader(data, batch_size=None, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          worker_init_fn=worker_init)


def digits(cfg: Any, *, seed: int) -> InMemoryDataModule:
    x, y = digits_arrays(cfg.get("split", "train"))
    return InMemoryDataModule({"x": x, "y": y}, int(cfg["batch_size"]), seed=seed, flip=bool(cfg.get("flip", False)),
                              num_workers=int(cfg.get("num_workers", 0)), num_classes=10)


def gmm(cfg: Any, *, seed: int) -> InMemoryDataModule:
    mix = default_gmm()
    x, y = mix.sample(int(cfg.get("num_samples", 65536)), generator=torch.Generator().manual_seed(seed))
    return InMemoryDataModule({"x": x, "y": y}, int(cfg["batch_size"]), seed=seed, num_classes=len(mix.weights))


def patches(cfg: Any, *, seed: int) -> InMemoryDataModule:
    x = photo_patches(int(cfg.get("num_samples", 8192)), int(cfg.get("size", 32)), seed=seed)
    return InMemoryDataModule({"x": x}, int(cfg["batch_size"]), seed=seed, flip=bool(cfg.get("flip", True)),
                              num_workers=int(cfg.get("num_workers", 0)))
