"""benchmarks/common.fit_once: a finished run of the same recipe is reused, an interrupted one resumes, and a run of
another recipe is removed before training (never resumed from)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

from common import fit_once  # noqa: E402

from dtrain.config import load_recipe  # noqa: E402

QUIET = ["trainer.cpu_threads=1", "trainer.progress_bar=false", "logger.mode=disabled", "model.hidden=16",
         "model.depth=1", "data.batch_size=32", "trainer.ckpt_every_n_steps=2", "name=t"]


def recipe(tmp_path, *over):
    return load_recipe(ROOT / "recipes" / "teacher" / "gmm.yaml", [f"out_dir={tmp_path}", *QUIET, *over])


def step(out: Path) -> int:
    return torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]


def test_reuse_resume_and_stale_run(tmp_path):
    out, seconds = fit_once(recipe(tmp_path, "trainer.max_steps=4"))
    assert seconds > 0 and step(out) == 4
    mtime = (out / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    assert fit_once(recipe(tmp_path, "trainer.max_steps=4")) == (out, seconds)  # reused, nothing rewritten
    assert (out / "checkpoints" / "last.ckpt").stat().st_mtime_ns == mtime

    (out / "train_seconds.json").unlink()  # as if killed after its last checkpoint: resumes, then marks it finished
    assert fit_once(recipe(tmp_path, "trainer.max_steps=4"))[0] == out and step(out) == 4
    assert json.loads((out / "train_seconds.json").read_text())["seconds"] >= 0

    (out / "checkpoints" / "stale.txt").write_text("from the old recipe")
    out2, _ = fit_once(recipe(tmp_path, "trainer.max_steps=2"))
    assert out2 == out and step(out) == 2 and not (out / "checkpoints" / "stale.txt").exists()


def test_a_run_saved_before_the_schema_grew_a_key_is_reused(tmp_path):
    """A run whose saved recipe lacks a key added to the schema since (``optim.name``, default adamw) trains the same:
    it is reused, not deleted and retrained; a saved recipe that differs in a value is not."""
    out, seconds = fit_once(recipe(tmp_path, "trainer.max_steps=2"))
    saved = out / "recipe.yaml"
    text = saved.read_text()
    assert "  name: adamw\n" in text
    saved.write_text(text.replace("  name: adamw\n", "", 1))
    assert fit_once(recipe(tmp_path, "trainer.max_steps=2")) == (out, seconds)
    saved.write_text(text.replace("  name: adamw\n", "  name: radam\n", 1))
    assert fit_once(recipe(tmp_path, "trainer.max_steps=2"))[1] != seconds  # another optimizer: trained again
