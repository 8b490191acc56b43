"""WebDataset shards as a LightningDataModule: exact rank/worker split, equal per-rank counts, exact resume.

One epoch (finite mode). The shards, in an order seeded by (seed, epoch), form one sequence of N samples
(counts from the index). Rank r of W takes positions [r Q, (r + 1) Q), Q = N // W: every rank gets the same
number of samples and batches whatever the shard count (the N mod W tail, at most W - 1 samples, is left
out of that epoch), so DDP never waits at an epoch end. An epoch that leaves samples out (that tail, drop_last
remainders, a shorter epoch_size) reads the sequence as a ring from a start seeded by (seed, epoch), so that
it leaves out other samples each epoch. The rank's batches are cut into contiguous runs,
one per DataLoader worker. A worker reads its run sequentially (at most one partly read shard at each end),
shuffles it in blocks of ``shuffle`` raw samples (permutation and flips seeded by seed, epoch, rank,
worker, block), decodes, normalises to [-1, 1] and batches inside the worker.

Resampled mode: each (rank, worker) draws whole shards with replacement from its own seeded stream; an
epoch is ``epoch_size`` samples over all ranks, the stream goes on across epochs (WebDataset's
``resampled=True`` + ``with_epoch``, made deterministic).

Ranks come from the trainer (``trainer.global_rank``/``world_size``), which is right under ddp, ddp_spawn,
SLURM and spawned DataLoader workers, where WebDataset's env-var split silently duplicates data.

Resume. Batch i of a rank's epoch comes from worker i mod n (its batch i // n): the order in which
PyTorch's DataLoader collects from its workers. Every batch carries (epoch, i); the datamodule strips it
before the batch reaches the model and keeps c, the number of batches handed to training. ``state_dict``
saves (epoch, c); a resumed loader gives its workers the roles of workers c, c + 1, ... (mod n) and each
skips what it already delivered, so it yields exactly batches c, c + 1, ... of the uninterrupted run (the
stream is a pure function of seed, epoch, rank, worker and layout; whole shuffle blocks are skipped
without reading). Workers are persistent; (epoch, c) reach them through shared memory at each epoch start.

Bad data. An unreadable tar member, a truncated shard (fewer samples than the index says) or an image that
does not decode to the index's size is skipped: logged with shard and key, counted (``bad_samples``, logged
as ``data/bad_samples`` by :class:`SkippedSamplesLogger`), and its batch slot is filled with a repeat of a
good sample, so batch sizes and counts stay equal across ranks. A missing local shard or an empty pattern
fails in ``setup`` naming the path.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from dtrain.data import DATAMODULES, worker_init
from dtrain.data.stream import META, ShardSet, WdsStream, rank_batches, resolve_shards, split_batches
from dtrain.errors import InputError

# Lightning warns that an IterableDataset's __len__ may be wrong with several workers; ours is exact (the
# batches of one rank, split across workers by construction).
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")

__all__ = ["WdsDataModule", "SkippedSamplesLogger", "WdsStream", "ShardSet", "resolve_shards", "rank_batches",
           "split_batches"]


# ---------------------------------------------------------------------------------------------
# Lightning


class _Loader(DataLoader):
    """A DataLoader that sets the stream's epoch and resume position right before an epoch's iterator starts.

    Its ``state_dict`` is the datamodule's (so Lightning sees a resumable loader; restoring twice is harmless).
    """

    def __init__(self, *args: Any, datamodule: WdsDataModule, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._dm = datamodule

    def __iter__(self):
        self._dm._before_iter()
        return super().__iter__()

    def state_dict(self) -> dict[str, Any]:
        return self._dm.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._dm.load_state_dict(state_dict)


def _env_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class WdsDataModule(L.LightningDataModule):
    """WebDataset shards -> batches {"x": [-1, 1] float [B, C, H, W], "y": labels, "latent"?} (see module doc).

    ``shards``: a brace pattern (``data/train-{000000..000099}.tar``), ``::``-joined patterns, ``pipe:``
    commands (``pipe:aws s3 cp s3://bucket/train-{000000..000099}.tar -``), or an index json.
    ``shuffle``: shuffle block size in samples (1 = read order). ``epoch_size``: samples per epoch over
    all ranks (default: all; with ``resampled`` any number).
    """

    def __init__(self, shards: str | Sequence[str], index: str | None = None, *, batch_size: int = 128,
                 num_workers: int = 2, shuffle: int = 1000, shuffle_shards: bool = True, resampled: bool = False,
                 epoch_size: int | None = None, drop_last: bool = True, flip: bool = False, labels: bool = True,
                 latents: bool = False, mp_context: str | None = None, seed: int = 0) -> None:
        super().__init__()
        self.spec, self.index = shards, index
        self.opts = dict(batch_size=batch_size, shuffle=shuffle, shuffle_shards=shuffle_shards, resampled=resampled,
                         epoch_size=epoch_size, drop_last=drop_last, flip=flip, labels=labels, latents=latents)
        self.num_workers, self.mp_context, self.seed = num_workers, mp_context, seed
        self.shards: ShardSet | None = None
        self.model_classes = 0  # model.num_classes (``dtrain fit`` sets it): labels of shards without an index
        self.stream: WdsStream | None = None
        self.bad_samples = 0  # this rank's skipped samples in this run (logged summed over ranks)
        self._epoch: int | None = None  # the epoch of ``_consumed``
        self._consumed = 0  # batches of that epoch handed to training
        self._loaded: dict[str, Any] | None = None

    # what a model needs to know (as dtrain.data.memory.InMemoryDataModule has it)
    @property
    def shape(self) -> tuple[int, int, int]:
        s = self._shardset()
        return (s.channels, *s.image_size)

    @property
    def num_classes(self) -> int:
        return self._shardset().num_classes

    @property
    def class_names(self) -> list[str] | None:
        """The shard index's class names (``dtrain shards folder``: the sub-folders), or None."""
        return [str(c) for c in self._shardset().classes] or None

    def _shardset(self) -> ShardSet:
        if self.shards is None:
            self.shards = resolve_shards(self.spec, self.index)
            if self.opts["labels"] and self.shards.keys and "cls" not in self.shards.keys:
                raise InputError(f"data.labels: the shards have no .cls labels ({self.shards.index or self.spec}); "
                                 "set data.labels=false and model.num_classes=0, or write the shards with labels")
            if self.opts["latents"] and "npy" not in self.shards.keys:
                raise InputError(f"data.latents: the shards have no .npy latents ({self.shards.index or self.spec}); "
                                 "set data.latents=false or write shards with latents")
        return self.shards

    def setup(self, stage: str | None = None) -> None:
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else _env_rank()
        if self.stream is None or (self.stream.rank, self.stream.world_size) != (rank, world):
            self.stream = WdsStream(self._shardset(), rank=rank, world_size=world, seed=self.seed,
                                    num_classes=self.model_classes, **self.opts)

    def train_dataloader(self) -> DataLoader:
        if self.stream is None:
            self.setup("fit")
        kw: dict[str, Any] = {}
        if self.num_workers > 0:
            kw = dict(multiprocessing_context=self.mp_context)
        return _Loader(self.stream, batch_size=None, num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                       persistent_workers=self.num_workers > 0, worker_init_fn=worker_init, datamodule=self, **kw)

    def _current_epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.current_epoch if trainer is not None else 0

    def _layout(self) -> dict[str, Any]:
        assert self.stream is not None
        return {"world_size": self.stream.world_size, "num_workers": max(1, self.num_workers),
                "batches": len(self.stream), "batch_size": self.stream.batch_size,
                "resampled": self.stream.resampled, "samples": self._shardset().total, "seed": self.seed,
                "shuffle": self.stream.shuffle, "shuffle_shards": self.stream.shuffle_shards,
                "shards": len(self._shardset().counts), "ring_start": self.stream.ring_start}

    def _before_iter(self) -> None:
        """The data epoch and position of a new pass: the restored ones, the trainer's epoch on a fresh start, and
        the next epoch once one is used up. The datamodule keeps its own count: after a resume from an epoch's last
        batch Lightning makes an empty pass and its epoch counter runs one ahead of the data."""
        assert self.stream is not None
        epoch = self._current_epoch()
        if self._loaded is not None:
            self._epoch, self._consumed = self._restore(self._loaded)
            self._loaded = None
        elif self._epoch is None:
            self._epoch, self._consumed = epoch, 0
        elif getattr(self, "trainer", None) is None:  # no trainer: each further pass is the next epoch (after a
            self._epoch, self._consumed = self._epoch + 1, 0  # restored one too)
        if self._consumed >= len(self.stream):
            self._epoch, self._consumed = self._epoch + 1, 0
        self.stream.epoch, self.stream.start = self._epoch, self._consumed

    def _restore(self, state: dict[str, Any]) -> tuple[int, int]:
        saved, now = state.get("layout") or {}, self._layout()
        older = {"ring_start": False}  # what checkpoints from before a key was added ran with
        if saved and all(saved.get(k, older.get(k, v)) == v for k, v in now.items()):  # other keys they lack: equal
            return int(state["epoch"]), int(state["consumed"])
        # another world size / worker count / batch size: keep the fraction of the epoch already seen
        frac = int(state["consumed"]) / max(1, int(state.get("layout", {}).get("batches", len(self.stream))))
        warnings.warn(f"data: resuming with another layout ({state.get('layout')} -> {self._layout()}): the exact "
                      f"position cannot be restored, so this epoch goes on at the same fraction ({frac:.1%}) in the "
                      f"new layout, which repeats some of its samples and leaves out others (the next epoch is "
                      f"whole); resume with the saved layout to continue exactly", stacklevel=2)
        return int(state["epoch"]), int(frac * len(self.stream))  # type: ignore[arg-type]

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and META in batch:
            epoch, seq, bad, *error = batch.pop(META)
            if error:  # a worker found bad data (dtrain.data.stream.WdsStream.__iter__)
                raise InputError(error[0])
            trainer = getattr(self, "trainer", None)
            if trainer is None or trainer.training:
                if epoch == self._epoch:
                    self._consumed = max(self._consumed, int(seq) + 1)
                self.bad_samples += int(bad)
        return batch

    def callbacks(self) -> list[L.Callback]:
        """Callbacks ``dtrain fit`` adds for this datamodule: the skipped-sample counter (``data/bad_samples``)."""
        return [SkippedSamplesLogger()]

    def state_dict(self) -> dict[str, Any]:
        if self.stream is None or self._epoch is None:
            return {}
        return {"epoch": self._epoch, "consumed": self._consumed, "layout": self._layout()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._loaded = dict(state_dict)


class SkippedSamplesLogger(L.Callback):
    """Logs ``data/bad_samples``: samples skipped so far in this run, summed over ranks, at logging steps."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "bad_samples"):
            return
        if not getattr(trainer._logger_connector, "should_update_logs", True) and not trainer.is_last_batch:
            return
        total = trainer.strategy.reduce(torch.tensor(float(dm.bad_samples), device=pl_module.device),
                                        reduce_op="sum")
        pl_module.log("data/bad_samples", total, on_step=True, on_epoch=False, rank_zero_only=True)


@DATAMODULES.register("wds")
def build(cfg: Mapping[str, Any], *, seed: int) -> WdsDataModule:
    """The ``wds`` datamodule from a recipe's ``data`` section (``dtrain.config.WdsDataCfg``)."""
    kw = {k: v for k, v in dict(cfg).items() if k != "name"}
    return WdsDataModule(**kw, seed=seed)
