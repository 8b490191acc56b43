"""Callbacks of the training lifecycle: EMA update, sample grids, checkpoints (last + every N steps)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dtrain.eval.grids import image_grid

__all__ = ["EMAUpdate", "SampleGrid", "StepCheckpoint"]


class EMAUpdate(L.Callback):
    """Averages ``pl_module.net`` into ``pl_module.ema`` after each optimizer step.

    A callback so it runs before ``ModelCheckpoint`` (which Lightning orders last): a checkpoint of
    step N holds the EMA of step N. Works for manual optimization too (it watches ``global_step``).
    Steps skipped by the non-finite guard (``pl_module.guard.skipped``) are not averaged in.
    """

    def __init__(self) -> None:
        self._last = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._last = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step != self._last:
            self._last = step
            guard = getattr(pl_module, "guard", None)
            if guard is None or not guard.skipped:  # a step the non-finite guard dropped changes no weights
                pl_module.ema.update(pl_module.net, pl_module.ema_step(step))


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` (rank 0): sample with the recipe's sampler, save a PNG, log it to image loggers.

    Class-conditional models get one row per class (``per_class`` each, CFG from ``sampler.guidance``), for at
    most ``max_classes`` classes spread over the label range (ImageNet's 1000 classes x 8 made one batch of 8000
    images, 16000 with CFG); the noise is fixed (``seed``) so grids of successive steps are comparable.
    """

    def __init__(self, every_n_steps: int, out_dir: str | Path | None = None, per_class: int = 8,
                 num: int = 64, seed: int = 0, max_classes: int = 16) -> None:
        self.every, self.out_dir, self.per_class, self.num, self.seed = every_n_steps, out_dir, per_class, num, seed
        self.max_classes = max_classes
        self._last = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._last = trainer.global_step  # under accumulation the first micro-batch ends at the start step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every <= 0 or step == self._last or step % self.every or not pl_module.is_image:
            return
        self._last = step
        if trainer.is_global_zero:
            self.log_grid(trainer, pl_module, step)

    def log_grid(self, trainer: L.Trainer, pl_module: Any, step: int) -> Path | None:
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        k = pl_module.num_classes
        if k > 0:
            shown = torch.arange(k) if k <= self.max_classes else torch.linspace(0, k - 1, self.max_classes).round()
            labels = shown.long().repeat_interleave(self.per_class)
            x, nrow = pl_module.sample(labels=labels, generator=g), self.per_class
        else:
            x, nrow = pl_module.sample(self.num, generator=g), int(self.num**0.5)
        img = image_grid(x, nrow, upscale=max(1, 32 // x.shape[-1]))
        path = None
        if self.out_dir is not None:
            from PIL import Image

            path = Path(self.out_dir) / f"step_{step:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(path)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="samples", images=[img], step=step, caption=[f"step {step}"])
        return path


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` every N steps (``step0001000.ckpt``) plus ``last.ckpt``, which is also written when
    training ends between two periodic saves, so the final weights are always on disk (unless a signal's
    ``hpc_ckpt_<n>.ckpt`` of that step was just written: ``dtrain.dist.slurm.Preemption``). ``keep`` > 0: only
    the newest ``keep`` periodic checkpoints stay, and a signal's checkpoint goes once a newer periodic one is
    written."""

    def __init__(self, dirpath: str | Path, every_n_steps: int, keep: int = 0) -> None:
        self.keep = keep  # pruned here, not by ModelCheckpoint's top-k: its state (and resume) stays the same
        super().__init__(dirpath=dirpath, filename="step{step:07d}", auto_insert_metric_name=False,
                         every_n_train_steps=every_n_steps or None, save_top_k=-1 if every_n_steps else 0,
                         save_last=True, save_on_train_epoch_end=False,
                         enable_version_counter=False)  # a moved run's resume rewrites last.ckpt, no last-v1.ckpt

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        """A sharded directory rewritten in place (``last.ckpt``) first loses its finished-save marker (DeepSpeed's
        ``latest``, FSDP's ``meta.pt``, each written last), so a save killed halfway is skipped on resume
        (``dtrain.lit.checkpointing``) rather than read half old, half new."""
        from dtrain.lit.checkpointing import SHARDED_DONE

        if trainer.world_size > 1 or Path(filepath).is_dir():  # every rank takes the same branch (broadcast)
            if trainer.strategy.broadcast(Path(filepath).is_dir()):
                if trainer.is_global_zero:
                    for name in SHARDED_DONE:
                        (Path(filepath) / name).unlink(missing_ok=True)
                trainer.strategy.barrier("dtrain_sharded_rewrite")
        super()._save_checkpoint(trainer, filepath)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
                           ) -> None:
        before = self._last_global_step_saved
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.keep > 0 and self._last_global_step_saved != before and trainer.is_global_zero:
            self.prune(Path(self.dirpath), self.keep)

    @staticmethod
    def prune(ckpt_dir: Path, keep: int) -> None:
        """Keep the newest ``keep`` ``step*.ckpt`` of ``ckpt_dir`` (by step; files or sharded directories, also
        those of earlier jobs) and drop the signal checkpoints (``../hpc_ckpt_<n>.ckpt``) older than the newest."""
        import re
        import shutil

        def drop(p: Path) -> None:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

        steps = sorted((int(m.group(1)), p) for p in ckpt_dir.glob("step*.ckpt")
                       if (m := re.fullmatch(r"step(\d+)\.ckpt", p.name)))
        for _, old in steps[:-keep]:
            drop(old)
        if steps:
            newest = steps[-1][1].stat().st_mtime_ns
            for old in ckpt_dir.parent.glob("hpc_ckpt_*.ckpt"):
                if old.stat().st_mtime_ns < newest:
                    drop(old)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        from dtrain.dist.slurm import Preemption

        if any(isinstance(c, Preemption) and c.saved_step == trainer.global_step for c in trainer.callbacks):
            return  # stopped on a signal right after its checkpoint: no second copy inside the kill grace time
        if self._last_global_step_saved != trainer.global_step:
            self._save_checkpoint(trainer, str(Path(self.dirpath) / (self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)))
