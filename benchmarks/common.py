"""Shared pieces of the digits benchmarks: a cached digits teacher and machine facts.

``digits_teacher()`` trains ``recipes/teacher/digits.yaml`` once (through ``dtrain.lit.fit.fit``, the code path
of ``dtrain fit``) into ``runs/bench/teacher-digits`` and returns its ``last.ckpt``; later calls reuse it while
the resolved recipe is unchanged (its YAML is compared with the run's ``recipe.yaml``).
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TEACHER_RECIPE = ROOT / "recipes" / "teacher" / "digits.yaml"
BENCH_RUNS = ROOT / "runs" / "bench"


def fit_once(cfg) -> tuple[Path, float | None]:
    """(run dir, training seconds) of the resolved recipe ``cfg`` trained by ``dtrain.lit.fit.fit`` (the code path
    of ``dtrain fit``). A finished run of the same recipe (its recipe.yaml equal, ``train_seconds.json`` written
    when fit returned) is reused with its recorded seconds; an unfinished one resumes from its newest checkpoint
    (seconds: this call's); a run of another recipe is removed first, so it is never resumed from or mixed in. One
    trainer at a time per run directory (file lock); the others wait and reuse."""
    import fcntl
    import json
    import shutil
    import time

    from omegaconf import OmegaConf

    from dtrain.lit.fit import fit, run_dir

    out = run_dir(cfg)
    saved, timing = out / "recipe.yaml", out / "train_seconds.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        same = saved.is_file() and _same_recipe(saved, OmegaConf.to_yaml(cfg))
        if same and timing.is_file():
            return out, json.loads(timing.read_text())["seconds"]
        if out.exists() and not same:
            shutil.rmtree(out)
        t0 = time.perf_counter()
        fit(cfg, resume="auto" if same else None)
        seconds = time.perf_counter() - t0
        timing.write_text(json.dumps({"seconds": seconds}) + "\n")
        return out, seconds


def _same_recipe(saved: Path, resolved: str) -> bool:
    """A run's saved recipe is this resolved one: equal text, or equal once read through the current schema (a
    recipe saved before the schema grew a key lacks it; filled with its default it trains the same)."""
    from omegaconf import OmegaConf

    from dtrain.config import load_recipe

    text = saved.read_text()
    if text == resolved:
        return True
    try:
        return OmegaConf.to_yaml(load_recipe(saved)) == resolved
    except Exception:  # a recipe the current schema refuses is another recipe
        return False


def digits_teacher(overrides: tuple[str, ...] = (), root: Path = BENCH_RUNS, recipe: Path | None = None) -> Path:
    """Path of a trained digits teacher checkpoint (trained on first use, minutes on 2 CPU cores): ``recipe``, by
    default recipes/teacher/digits.yaml."""
    from dtrain.config import load_recipe

    cfg = load_recipe(recipe or TEACHER_RECIPE, [f"out_dir={root}", "logger.mode=disabled",
                                                 "trainer.progress_bar=false", *overrides])
    return fit_once(cfg)[0] / "checkpoints" / "last.ckpt"


def cached_fid_rows(model, key: str, specs: list[tuple[str, list[int]]], *, num: int, batch_size: int, seed: int,
                    guidance: float, extractor, ref, ref_source: str, **kw) -> list[dict]:
    """``dtrain.eval.sweep.fid_sweep`` rows of ``model`` per (sampler, NFE), each point cached as JSON in
    runs/bench/fid_cache under ``key`` (e.g. the teacher checkpoint's sha256) and the sweep settings, so the digits
    benchmarks that score the same teacher share its points. A point depends only on these settings: x_T comes from
    (seed, sample index), not from the other points of a sweep."""
    import hashlib
    import json

    from dtrain.eval.sweep import fid_sweep
    from dtrain.fileio import write_json

    cache = BENCH_RUNS / "fid_cache"
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, budgets in specs:
        for nfe in budgets:
            what = json.dumps([key, name, nfe, num, batch_size, seed, guidance, ref_source, extractor.weights_sha256])
            f = cache / f"{hashlib.sha256(what.encode()).hexdigest()[:24]}.json"
            if f.is_file():
                rows.append(json.loads(f.read_text())["row"])
                continue
            (row,) = fid_sweep(model, [(name, [nfe])], num=num, batch_size=batch_size, seed=seed, guidance=guidance,
                               extractor=extractor, ref=ref, ref_source=ref_source, **kw)
            write_json(f, {"key": json.loads(what), "row": row.to_dict()}, indent=None)  # read by later runs
            rows.append(row.to_dict())
    return rows


def machine() -> dict:
    """Where and with what a result was measured, with the code's commit (``<sha>-dirty`` with local changes)."""
    import torch

    from dtrain.export.checkpoint import git_commit

    return {"git_commit": git_commit(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(), "processor": platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "loadavg": list(os.getloadavg())}
