"""Datamodules by registry name, built from a recipe's ``data`` section.

``build_datamodule(data_cfg, seed=...)`` returns a LightningDataModule whose batches are dicts
{"x": float [B, C, H, W] or [B, D] in about [-1, 1], "y": LongTensor [B] (labelled data only)}.
In memory (``dtrain.data.memory``): ``digits``, ``gmm``, ``patches``. Other sources live in their own
module ``dtrain/data/<name>.py`` that registers itself in ``DATAMODULES`` on import (e.g. ``wds``);
``build_datamodule`` imports that module the first time its name is asked for, so WebDataset is only
imported by runs that read shards. Their DataLoaders start workers with ``worker_init``.
"""

from __future__ import annotations

import atexit
import importlib
import multiprocessing.util  # its exit handler is registered first, so it runs after _release_workers (LIFO)
import os
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any

from dtrain.registry import Registry

__all__ = ["DATAMODULES", "build_datamodule", "worker_init"]

DATAMODULES: Registry[Callable[..., Any]] = Registry("data")


def _memory(name: str) -> Callable[..., Any]:
    def build(cfg: Mapping[str, Any], *, seed: int) -> Any:
        from dtrain.data import memory

        return getattr(memory, name)(cfg, seed=seed)

    build.__doc__ = f"In-memory ``{name}`` data (``dtrain.data.memory.{name}``)."
    return build


for _name in ("digits", "gmm", "patches"):
    DATAMODULES.register(_name, _memory(_name))


def build_datamodule(data_cfg: Mapping[str, Any], *, seed: int) -> Any:
    """The LightningDataModule named by ``data_cfg["name"]``."""
    name = str(data_cfg.get("name", "digits"))
    if name not in DATAMODULES:
        try:  # a source in its own module registers itself on import
            importlib.import_module(f"dtrain.data.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"dtrain.data.{name}":
                raise
    return DATAMODULES.get(name, "data.name")(data_cfg, seed=seed)


def worker_init(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the worker outlives the SIGTERM / SIGUSR1 that SLURM (or ``kill`` of the
    process group) sends every process of a job, so the main process can finish its step and checkpoint
    (``dtrain.dist.slurm.Preemption``); a worker killed by it would fail the main process on its next batch
    (torch: "DataLoader worker exited unexpectedly"). A second SIGTERM ends the worker (SLURM repeats SIGTERM right
    before SIGKILL). Workers normally exit on the loader's shutdown message; one stuck in dataset code outlives the
    loader's single ``terminate()`` until multiprocessing's exit handler sends the second. Then Lightning's
    worker seeding, when ``seed_everything(workers=True)`` asked for it (Lightning adds its own only to
    loaders without a ``worker_init_fn``).
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _second_sigterm_exits)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)


def _second_sigterm_exits(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _release_workers() -> None:
    """At interpreter exit, before multiprocessing's handler (which sends each daemon child one SIGTERM and then
    waits for it): two SIGTERMs to each live daemon child, so a worker of a loader still alive at exit (a script that
    crashed holding its iterator) ends instead of outliving the one SIGTERM and hanging the exit forever."""
    kids = [p for p in multiprocessing.active_children() if p.daemon]
    if kids and hasattr(signal, "SIGCHLD"):  # torch's SIGCHLD handler would report each end as a worker failure
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for i in range(2 if kids else 0):
        for p in kids:
            p.terminate()
        time.sleep(0.05 * (1 - i))  # let the first one switch the worker's handler back to the default


atexit.register(_release_workers)
