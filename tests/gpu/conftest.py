"""GPU tests: skipped without CUDA. Results (checkpoints, logs, a summary.json per test) go under
``$DTRAIN_GPU_OUT`` when set, else pytest's tmp_path:

    DTRAIN_GPU_OUT=$OUT python -m pytest -q tests/gpu -p no:cacheprovider

Needs torch, lightning, omegaconf and deepspeed (the DeepSpeed tests skip without it); not wandb, webdataset or
sklearn (runs log to CSV).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import torch


def _is_gpu(item) -> bool:  # hooks called for every item (not through item.ihook) see the other tests' too
    return "tests/gpu" in str(item.path).replace(os.sep, "/")


def pytest_runtest_setup(item):
    """``$DTRAIN_GPU_DEADLINE`` (epoch seconds, set by tools/gpu_offline.sh): tests that would start within 30 s
    of it are skipped, so a time-limited run ends by itself with its report instead of being killed."""
    deadline = os.environ.get("DTRAIN_GPU_DEADLINE")
    if deadline and time.time() > float(deadline) - 30:
        pytest.skip("out of time: DTRAIN_GPU_DEADLINE is less than 30 s away")


@pytest.hookimpl(wrapper=True, tryfirst=True)  # before pytest-timeout's wrapper, which reads the limit (setup: late)
def pytest_runtest_protocol(item, nextitem):
    """With pytest-timeout, a GPU test may run until 10 s before ``$DTRAIN_GPU_DEADLINE`` (or its own timeout mark,
    if sooner): one still running then fails with its traceback and summary, and pytest ends with its report before
    tools/gpu_offline.sh interrupts it."""
    deadline = os.environ.get("DTRAIN_GPU_DEADLINE")
    if deadline and item.config.pluginmanager.hasplugin("timeout") and _is_gpu(item):
        left = max(1.0, float(deadline) - 10 - time.time())
        own = item.get_closest_marker("timeout")
        if not (own and own.args and 0 < own.args[0] <= left):
            item.add_marker(pytest.mark.timeout(left), append=False)
    return (yield)


# the order a time-limited run (tools/gpu_offline.sh) takes them in: the quick, independent strategies first; the
# DeepSpeed tests compile their ops on first use, the CPU-Adam build of the offload test (30-60 s) comes last
FIRST = ("test_ddp_reference", "test_fsdp2", "test_fsdp[", "test_deepspeed[", "test_deepspeed_stage2",
         "test_deepspeed_offload")


def _rank(item) -> int:
    return next((i for i, name in enumerate(FIRST) if item.name.startswith(name)), len(FIRST))


def pytest_collection_modifyitems(config, items):
    gpu = [i for i, item in enumerate(items) if _is_gpu(item)]
    if torch.cuda.is_available():
        for i, item in zip(gpu, sorted((items[i] for i in gpu), key=_rank)):  # in place: others keep theirs
            items[i] = item
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU here)")
    for i in gpu:
        items[i].add_marker(skip)


@pytest.fixture
def out_dir(request, tmp_path) -> Path:
    """Where a test writes its run: ``$DTRAIN_GPU_OUT/<test name>`` or tmp_path."""
    root = os.environ.get("DTRAIN_GPU_OUT")
    if not root:
        return tmp_path
    d = Path(root) / re.sub(r"[^\w.-]+", "_", request.node.name)
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture
def summary(out_dir):
    """A dict the test fills; written to ``<out_dir>/summary.json`` afterwards (also when the test fails)."""
    data: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "torch": torch.__version__}
    yield data
    (out_dir / "summary.json").write_text(json.dumps(data, indent=2, default=str))
