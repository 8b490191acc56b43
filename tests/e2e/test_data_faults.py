"""Data faults in a real `dtrain fit` on WebDataset shards: a whole shard that disappears mid-run is reported (one log
line naming it), its samples are skipped and counted (`data/bad_samples`, logged by the datamodule's own callback
that `fit` adds), and the run finishes instead of hanging; corrupt members are skipped and counted too."""

from __future__ import annotations

import csv
import io
import logging
import tarfile
from pathlib import Path

import lightning as L
import pytest

from dtrain.data.shards import from_digits, write_shards
from dtrain.lit.fit import fit

BASE = Path(__file__).resolve().parents[2] / "recipes" / "_base" / "train.yaml"
TINY = BASE.with_name("tiny_wds_digits.yaml")  # the tiny UNet teacher on shards


@pytest.fixture
def shards(tmp_path) -> Path:
    """4 shards x 16 digits (in source order), 8x8 grayscale with labels."""
    d = from_digits("all")
    d.images, d.labels = d.images[:64], d.labels[:64]
    write_shards(d, tmp_path / "shards", num_shards=4, shuffle=False, progress=False)
    return tmp_path / "shards"


def recipe(tmp: Path, shards: Path, workers: int) -> Path:
    p = tmp / "wds.yaml"
    p.write_text(f"""base: [{BASE}, {TINY}]
name: faults
out_dir: {tmp / 'runs'}
data: {{name: wds, shards: "{shards}/train-{{000000..000003}}.tar", batch_size: 8, num_workers: {workers},
       shuffle: 1, shuffle_shards: false}}
trainer: {{max_steps: 16, ckpt_every_n_steps: 0, log_every_n_steps: 1, cpu_threads: 1, progress_bar: false}}
logger: {{mode: disabled}}
""")
    return p


class DeleteShard(L.Callback):
    def __init__(self, path: Path, at_step: int) -> None:
        self.path, self.at = path, at_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.at and self.path.exists():
            self.path.unlink()


def bad_samples(run: Path) -> list[float]:
    with open(run / "csv" / "metrics.csv") as f:
        return [float(r["data/bad_samples"]) for r in csv.DictReader(f) if r.get("data/bad_samples")]


@pytest.mark.timeout(120)
def test_shard_deleted_mid_run_is_reported_skipped_and_counted(tmp_path, shards, caplog, one_thread):
    """8 steps per epoch, shards read in order; shard 3 vanishes at step 1 (while shard 0 is read): each of the
    two epochs loses exactly its 16 samples, the slots are refilled with repeats, the run completes 16 steps."""
    gone = shards / "train-000003.tar"
    with caplog.at_level(logging.WARNING, logger="dtrain.data.wds"):
        run = fit(recipe(tmp_path, shards, 0), callbacks=[DeleteShard(gone, 1)])
    assert bad_samples(run)[-1] == 32.0 and bad_samples(run)[0] == 0.0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("shard ")]
    assert len(lines) == 2 and all(f"shard {gone}: FileNotFoundError" in m for m in lines), lines
    assert "skipping its samples 0..15" in lines[0]
    assert (run / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.timeout(120)
def test_missing_shard_with_workers_does_not_hang(tmp_path, shards, one_thread):
    """The same with 2 DataLoader workers (the failure happens in a worker process, which logs it): counted, and
    the run completes."""
    gone = shards / "train-000002.tar"
    run = fit(recipe(tmp_path, shards, 2), callbacks=[DeleteShard(gone, 1)])
    assert 16.0 <= bad_samples(run)[-1] <= 32.0  # a worker may have opened it before it vanished (then it reads on)
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_corrupt_members_are_skipped_and_counted(tmp_path, shards, one_thread):
    """Two undecodable PNGs in shard 1: 2 skipped per epoch, 4 in the 2-epoch run."""
    path = shards / "train-000001.tar"
    with tarfile.open(path) as tf:
        members = [(ti, tf.extractfile(ti).read()) for ti in tf]
    pngs = [ti.name for ti, _ in members if ti.name.endswith(".png")]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as out:
        for ti, data in members:
            if ti.name in (pngs[0], pngs[6]):
                data = bytes(len(data))  # zeros: not an image
            out.addfile(ti, io.BytesIO(data))
    run = fit(recipe(tmp_path, shards, 0))
    assert bad_samples(run)[-1] == 4.0
