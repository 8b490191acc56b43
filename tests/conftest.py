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
