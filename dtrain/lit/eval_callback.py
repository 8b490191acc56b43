"""A small FID-vs-NFE sweep every N training steps (``eval.every_n_steps``), on every rank.

All ranks sample their share of ``eval.num`` samples from the module's default EMA denoiser (the sum is
exact, see ``dtrain.eval.sweep``); rank 0 logs FID per (sampler, NFE) to every logger, and with W&B the
table, the FID-vs-NFE line plot and a sample grid per point; ``out_dir`` gets ``step_XXXXXXX.json``.

The checkpoint of step N is written before step N's sweep runs (at the next batch's start, or at the end of
training), so a fit resumed from it cannot tell from the checkpoint whether the job before completed that sweep:
``step_XXXXXXX.json`` (``complete``: false for a sweep a signal cut short) is the record it reads instead.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from dtrain.eval.sweep import SweepRow, parse_specs

__all__ = ["FIDSweepCallback"]


class FIDSweepCallback(L.Callback):
    """Every ``every_n_steps`` optimizer steps: ``fid_sweep`` of ``pl_module.denoiser_for(ema)``.

    The module must provide ``denoiser_for(tag)``, ``guided(denoiser, w)``, ``default_ema``, ``num_classes``,
    ``sample_shape`` and ``sample_grids()`` (``dtrain.lit.common.DiffusionModule`` does).
    """

    def __init__(
        self,
        samplers: Sequence[str],
        *,
        every_n_steps: int,
        ref_stats: str,
        num: int = 1000,
        batch_size: int = 250,
        feature_extractor: str = "digits",
        weights_path: str | None = None,
        guidance: float = 1.0,
        seed: int = 0,
        ema: str | None = "default",
        out_dir: str | Path | None = None,
        at_end: bool = True,
    ) -> None:
        self.specs = parse_specs(list(samplers))
        self.every, self.ref_path, self.num, self.batch_size = every_n_steps, ref_stats, num, batch_size
        self.extractor_name, self.weights_path = feature_extractor, weights_path
        self.guidance, self.seed = guidance, seed
        self.ema, self.out_dir, self.at_end = ema, Path(out_dir) if out_dir is not None else None, at_end
        self._extractor: Any = None
        self._ref: Any = None
        self._last = -1  # the last step whose sweep ran in this process, or was found complete
        self._resumed: int | None = None  # the global step of the checkpoint this fit resumed from
        self.cut_short = False  # the last sweep was stopped by a signal (dtrain.dist.slurm.Preemption reads it)
        self.history: list[tuple[int, list[SweepRow]]] = []

    @classmethod
    def from_recipe(cls, cfg: Any, out_dir: str | Path | None = None) -> FIDSweepCallback:
        """From a resolved recipe's ``eval`` section (guidance defaults to ``sampler.guidance``)."""
        e = cfg.eval
        w = e.guidance if e.guidance is not None else cfg.sampler.guidance
        return cls(list(e.samplers), every_n_steps=e.every_n_steps, ref_stats=e.ref_stats, num=e.num,
                   batch_size=e.batch_size, feature_extractor=e.feature_extractor,
                   weights_path=e.feature_extractor_weights_path, guidance=float(w), seed=e.seed, out_dir=out_dir)

    def _setup_metric(self, shape: Sequence[int], device: torch.device) -> None:
        if self._extractor is None:
            from dtrain.eval.features import build_extractor
            from dtrain.eval.fid import load_ref

            self._extractor = build_extractor(self.extractor_name, self.weights_path, shape=shape).to(device)
            self._ref = load_ref(self.ref_path, self._extractor)
            self._ref.check(self._extractor, shape, str(self.ref_path))  # fail before training, not at step N

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._setup_metric(pl_module.sample_shape, pl_module.device)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self._resumed = checkpoint.get("global_step")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # at the start of the next batch: step N's EMA update (a batch-end callback) has happened
        step = trainer.global_step
        if self.every > 0 and step > 0 and step % self.every == 0 and self._due(trainer, step):
            self.run(trainer, pl_module, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self._end_due(trainer):
            self.run(trainer, pl_module, trainer.global_step)

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        # a fit resumed from the last step's checkpoint runs no training loop and no on_train_end: a final sweep the
        # job before did not complete (killed, or cut short by a signal) runs here, on the device the strategy's
        # teardown took the module from
        from dtrain.lit.common import on_root_device

        if not self._end_due(trainer):
            return
        with on_root_device(trainer, pl_module):
            self.run(trainer, pl_module, trainer.global_step)

    def _end_due(self, trainer: L.Trainer) -> bool:
        # at the end of the run only: a stop before max_steps (a SLURM requeue) leaves the sweep to the job that ends
        early = trainer.max_steps is not None and trainer.global_step < trainer.max_steps
        return self.at_end and not early and self._due(trainer, trainer.global_step)

    def _due(self, trainer: L.Trainer, step: int) -> bool:
        """Whether step's sweep is still to run: not run in this process, and, at the step a resumed fit starts
        from, not completed by the job before (its ``step_XXXXXXX.json`` says; rank 0 reads it for all ranks).
        Only that step: an earlier run's files in the folder say nothing of this run's other steps."""
        if step == self._last:
            return False
        if step != self._resumed or self.out_dir is None:
            return True
        done = trainer.is_global_zero and _complete(self.out_dir / f"step_{step:07d}.json", step)
        if trainer.strategy.broadcast(done, src=0):  # every rank sweeps, or none does
            self._last = step
            return False
        return True

    @torch.no_grad()
    def run(self, trainer: L.Trainer, pl_module: Any, step: int) -> list[SweepRow]:
        """The sweep (every rank), then logging (rank 0)."""
        from dtrain.dist.slurm import Preemption
        from dtrain.eval.sweep import fid_sweep

        self._last = step
        signals = next((c for c in trainer.callbacks if isinstance(c, Preemption)), None)
        halted: list[bool] = []

        def stop() -> bool:  # a SIGTERM / requeue signal on any rank: leave the time to its checkpoint
            halted.append(signals is not None and signals.pending(trainer) is not None)
            return halted[-1]

        def guide(d: Any, w: float, null: int) -> Any:  # the module's own, as its samples, bundles and dtrain eval:
            return pl_module.guided(d, w)  # a guided PD student takes w as an input, which CFG never gives it

        self._setup_metric(pl_module.sample_shape, pl_module.device)
        tag = pl_module.default_ema if self.ema == "default" else self.ema
        den = pl_module.denoiser_for(tag)
        modes = {m: m.training for m in den.modules()}  # restore each submodule's own mode afterwards
        den.eval()
        try:
            rows = fid_sweep(den, self.specs, num=self.num, batch_size=self.batch_size, shape=pl_module.sample_shape,
                             extractor=self._extractor, ref=self._ref,
                             num_classes=pl_module.num_classes, guidance=self.guidance, seed=self.seed,
                             device=pl_module.device, progress=False, ref_source=str(self.ref_path),
                             grids=pl_module.sample_grids(), guide=guide, stop=stop if signals is not None else None)
        finally:
            for m, was in modes.items():
                m.training = was
        if any(halted):
            rank_zero_warn(f"eval at step {step}: stopped after {len(rows)} point(s): a signal asked training to stop")
        self.history.append((step, rows))
        self.cut_short = any(halted)  # the same on every rank (stop() is a collective)
        if trainer.is_global_zero and rows:
            from dtrain.eval.report import summary_line

            self._log(trainer, rows, step, complete=not any(halted))
            from dtrain.lit.common import say

            say(trainer, f"eval at step {step}: {summary_line(rows)}")
        return rows

    def _log(self, trainer: L.Trainer, rows: list[SweepRow], step: int, complete: bool = True) -> None:
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                from dtrain.eval.report import log_wandb

                log_wandb(rows, logger.experiment, step=step)
            else:
                from dtrain.eval.report import scalars

                logger.log_metrics(scalars(rows), step=step)
        if self.out_dir is not None:
            from dtrain.eval.report import write_json

            write_json(rows, self.out_dir / f"step_{step:07d}.json", step=step, seed=self.seed,
                       ref_stats=str(self.ref_path), ref_count=self._ref.count, extractor=self.extractor_name,
                       guidance=self.guidance, complete=complete)


def _complete(path: Path, step: int) -> bool:
    """``path`` records a completed sweep of ``step`` (a file written before the ``complete`` field existed does
    not: that sweep runs again)."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or cut short while written
        return False
    return isinstance(rec, dict) and rec.get("step") == step and rec.get("complete") is True
