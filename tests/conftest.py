"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread_per_module():
    """Every test module runs torch on one intra-op thread (small tensors gain nothing from a second one, and on a
    busy 2-core machine OpenMP's second thread can wait a scheduler quantum per op: tests ran 20-50x slower), and
    gets the count back afterwards (``dtrain fit`` applies ``trainer.cpu_threads`` to this process)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_thread():
    """torch on one thread for the test (small convolutions gain nothing from threads, and lose a lot on a busy
    2-core machine); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory):
    """A 4-step digits teacher checkpoint (recipes/teacher/digits.yaml, 16 channels): real weights and provenance for
    the students' from-a-checkpoint tests, not a trained model."""
    from pathlib import Path

    from dtrain.cli import main

    out = tmp_path_factory.mktemp("digits_teacher")
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "teacher" / "digits.yaml"
    assert main(["fit", str(recipe), f"out_dir={out}", "trainer.cpu_threads=1", "trainer.progress_bar=false",
                 "logger.mode=disabled", "trainer.accelerator=cpu", "trainer.devices=1", "model.channels=16",
                 "trainer.max_steps=4", "data.batch_size=32", "trainer.sample_every_n_steps=0", "name=t"]) == 0
    return out / "t" / "checkpoints" / "last.ckpt"
