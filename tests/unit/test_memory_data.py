"""In-memory datamodules: real data, ranges, labels, disjoint ranks, replayable and resumable streams."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import pytest
import torch

from dtrain.data import DATAMODULES, build_datamodule
from dtrain.data.memory import InMemoryBatches, digits_arrays, photo_patches


def test_registry_and_unknown_name():
    assert {"digits", "gmm", "patches"} <= set(DATAMODULES.names())
    with pytest.raises(KeyError, match=r"data.name: unknown data 'mnist'; choose one of"):
        build_datamodule({"name": "mnist", "batch_size": 4}, seed=0)


def test_digits_are_sklearns_with_the_eval_split():
    from sklearn.datasets import load_digits

    x, y = digits_arrays("all")
    d = load_digits()
    assert x.shape == (1797, 1, 8, 8) and float(x.min()) == -1.0 and float(x.max()) == 1.0
    torch.testing.assert_close(x[:, 0], torch.from_numpy(d.images).float() / 8 - 1)
    tr, te = digits_arrays("train"), digits_arrays("test")
    assert len(tr[1]) == 1347 and len(te[1]) == 450
    assert float((torch.bincount(te[1]) - 0.25 * torch.bincount(y)).abs().max()) <= 1  # stratified


def test_patches_are_photo_crops():
    p = photo_patches(16, 32, seed=0)
    assert p.shape == (16, 3, 32, 32) and -1 <= float(p.min()) and float(p.max()) <= 1
    assert float(p.std()) > 0.1  # real content, not constant
    assert torch.equal(p, photo_patches(16, 32, seed=0)) and not torch.equal(p, photo_patches(16, 32, seed=1))


def test_batches_cover_each_epoch_once_and_ranks_are_disjoint():
    x = torch.arange(40.0)[:, None]
    seen = []
    for rank in range(2):
        it = iter(InMemoryBatches({"x": x}, 5, seed=3, rank=rank, world_size=2))
        epoch = torch.cat([b["x"] for b in islice(it, 4)])  # 20 samples per rank = 4 batches
        seen.append(epoch)
        assert len(epoch.unique()) == 20
    assert not set(seen[0].flatten().tolist()) & set(seen[1].flatten().tolist())
    it = iter(InMemoryBatches({"x": x}, 5, seed=3))  # each epoch a fresh permutation (not the first one replayed)
    first, second = (torch.cat([b["x"] for b in islice(it, 8)]).flatten() for _ in range(2))
    assert sorted(first.tolist()) == sorted(second.tolist()) and not torch.equal(first, second)
    same = torch.arange(2.0).expand(16, 1, 1, 2)  # identical images: the batches differ only by their flips
    flips = [next(iter(InMemoryBatches({"x": same}, 8, seed=3, rank=r, world_size=2, flip=True)))["x"] for r in (0, 1)]
    assert not torch.equal(flips[0], flips[1])  # ranks flip their batches independently


def test_stream_is_replayable_and_resumes_mid_stream():
    x, y = torch.randn(30, 1, 2, 2), torch.arange(30)
    full = list(islice(iter(InMemoryBatches({"x": x, "y": y}, 4, seed=1, flip=True)), 17))
    again = list(islice(iter(InMemoryBatches({"x": x, "y": y}, 4, seed=1, flip=True)), 17))
    resumed = list(islice(iter(InMemoryBatches({"x": x, "y": y}, 4, seed=1, flip=True, start_batch=9)), 8))
    for a, b in zip(full, again):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])
    for a, b in zip(full[9:], resumed):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])
    other = next(iter(InMemoryBatches({"x": x, "y": y}, 4, seed=2)))
    assert not torch.equal(other["y"], full[0]["y"])


def test_flip_mirrors_about_half_the_images():
    x = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(400, 1, 1, 1)
    b = next(iter(InMemoryBatches({"x": x}, 400, seed=0, flip=True)))["x"]
    flipped = (b == x.flip(-1)).flatten(1).all(1)
    assert ((b == x).flatten(1).all(1) | flipped).all() and 0.4 < float(flipped.double().mean()) < 0.6


def test_batch_larger_than_the_rank_share_fails_clearly():
    with pytest.raises(ValueError, match=r"data.batch_size"):
        InMemoryBatches({"x": torch.zeros(10, 1)}, 8, world_size=2)


@pytest.mark.parametrize("name,shape,labels", [("digits", (1, 8, 8), True), ("gmm", (2,), True),
                                               ("patches", (3, 32, 32), False)])
def test_datamodules_yield_contract_batches(name, shape, labels):
    cfg = {"name": name, "batch_size": 8, "num_samples": 64}
    dm = build_datamodule(cfg, seed=0)
    b = next(iter(dm.train_dataloader()))
    assert b["x"].shape == (8, *shape) and b["x"].dtype == torch.float32
    assert ("y" in b) == labels
    if labels:
        assert b["y"].dtype == torch.long


def test_datamodule_resumes_after_the_trained_batches():
    from types import SimpleNamespace

    from dtrain.data.memory import InMemoryDataModule

    x = torch.arange(64.0)[:, None]
    dm = InMemoryDataModule({"x": x}, 4, seed=5)
    stream = list(islice(iter(dm.train_dataloader()), 12))
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, global_step=5, accumulate_grad_batches=2)
    assert torch.equal(next(iter(dm.train_dataloader()))["x"], stream[10]["x"])  # 5 steps x 2 micro-batches


def test_a_resume_on_another_rank_count_warns(tmp_path):
    """The checkpoint records the ranks the in-memory data was split over (Lightning saves the datamodule's state);
    a resume on another count warns, as the per-rank position no longer matches (the same count stays quiet)."""
    import warnings
    from types import SimpleNamespace

    from dtrain.data.memory import InMemoryDataModule
    from dtrain.lit.fit import fit

    gmm = Path(__file__).resolve().parents[2] / "recipes" / "teacher" / "gmm.yaml"
    run = fit(gmm, ["model.hidden=16", "model.depth=1", "data.batch_size=32", "data.num_samples=256",
                    "trainer.cpu_threads=1", "trainer.progress_bar=false", "logger.mode=disabled",
                    f"out_dir={tmp_path}", "trainer.max_steps=2"])
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["InMemoryDataModule"]
    assert saved == {"world_size": 1}
    for world, warns in ((2, True), (1, False)):
        dm = InMemoryDataModule({"x": torch.arange(64.0)[:, None]}, 4, seed=5)
        dm.load_state_dict(saved)
        dm.trainer = SimpleNamespace(global_rank=0, world_size=world, global_step=5, accumulate_grad_batches=1)
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            dm.train_dataloader()
        msgs = [str(w.message) for w in got if "in-memory data was split over 1 rank(s), now 2" in str(w.message)]
        assert bool(msgs) == warns, (world, [str(w.message) for w in got])


@pytest.mark.parametrize("start", [3, 4])
def test_resume_with_worker_processes_keeps_the_order(start):
    """Two DataLoader workers take alternate batches and the loader polls worker 0 first: a resume at an odd batch
    gives the uninterrupted order, not neighbouring batches swapped."""
    from types import SimpleNamespace

    from dtrain.data.memory import InMemoryDataModule

    dm = InMemoryDataModule({"x": torch.arange(64.0)[:, None]}, 4, seed=5, num_workers=2)
    stream = [b["x"] for b in islice(iter(dm.train_dataloader()), 10)]
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, global_step=start, accumulate_grad_batches=1)
    resumed = [b["x"] for b in islice(iter(dm.train_dataloader()), 6)]
    assert all(torch.equal(a, b) for a, b in zip(stream[start:], resumed, strict=False))


@pytest.mark.timeout(120)
def test_a_script_that_crashes_holding_a_loader_still_exits(tmp_path):
    """Workers outlive one SIGTERM (for the checkpoint on preemption), and at exit multiprocessing sends one and then
    waits: a script that crashed with a live multi-worker loader hung forever (a job holding its GPUs until the time
    limit). The exit now ends them, and stderr shows the crash alone."""
    import subprocess
    import sys

    script = tmp_path / "crash.py"
    script.write_text(
        "import torch\nfrom torch.utils.data import DataLoader, TensorDataset\nfrom dtrain.data import worker_init\n"
        "loader = DataLoader(TensorDataset(torch.arange(100.0)), batch_size=4, num_workers=2,\n"
        "                    worker_init_fn=worker_init, persistent_workers=True)\n"
        "it = iter(loader)\nnext(it)\nraise RuntimeError('crash with a live loader')\n")
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90)
    assert p.returncode == 1 and p.stderr.rstrip().endswith("RuntimeError: crash with a live loader"), p.stderr
