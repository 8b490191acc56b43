"""Inference needs none of the training stack: loading and sampling a bundle in a fresh interpreter must not
import Lightning, DeepSpeed, W&B or WebDataset (and ``import dtrain`` alone must not even import torch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from dtrain.diffusion.schedule import make_schedule
from dtrain.export.bundle import save_bundle
from dtrain.models import build_model

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ["lightning", "pytorch_lightning", "lightning_fabric", "deepspeed", "wandb", "webdataset"]

SCRIPT = """
import json, sys
import dtrain
light = sorted(m for m in ("torch", "numpy", "safetensors") if m in sys.modules)
from dtrain import load_bundle
import torch
pipe = load_bundle(sys.argv[1])
x = pipe.sample(3, nfe=2, generator=torch.Generator().manual_seed(0))
bad = sorted(m for m in json.loads(sys.argv[2]) if m in sys.modules)
print(json.dumps({"light": light, "bad": bad, "shape": list(x.shape), "finite": bool(x.isfinite().all())}))
"""


def _run(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_bundle_loads_and_samples_without_training_stack(tmp_path):
    cfg = {"name": "mlp", "dim": 2, "hidden": 16, "depth": 1, "num_classes": 2, "param": "velocity"}
    net = build_model(cfg)
    info = {"kind": "denoiser", "model": cfg, "schedule": make_schedule("flow", t_min=1e-3).to_dict(),
            "sampler": {"name": "euler", "nfe": 2, "spacing": None, "eta": None, "guidance": 2.0, "grid": None,
                        "options": {}},
            "image": {"shape": [2], "range": None}, "class_names": ["a", "b"], "provenance": {}}
    save_bundle(tmp_path / "b", {k: v + 0.1 * torch.randn_like(v) for k, v in net.state_dict().items()}, info)
    res = _run(SCRIPT, str(tmp_path / "b"), json.dumps(FORBIDDEN))
    assert res["light"] == [], "import dtrain should not import torch, numpy or safetensors"
    assert res["bad"] == [], f"loading a bundle imported {res['bad']}"
    assert res["shape"] == [3, 2] and res["finite"]


def test_probe_sees_a_training_import():
    """The same probe reports a forbidden module once something imports it (so the check above can fail)."""
    code = ("import json, sys, dtrain.export.bundle, webdataset; "
            f"print(json.dumps({{'bad': sorted(m for m in {FORBIDDEN!r} if m in sys.modules)}}))")
    assert _run(code)["bad"] == ["webdataset"]


BLOCKER = """
import importlib.abc, json, sys
class Blocker(importlib.abc.MetaPathFinder):  # the packages of pyproject's `train` extra are not installed
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in json.loads(sys.argv[2]):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Blocker())
"""


def test_the_core_install_samples_and_exports_and_says_what_training_needs(tmp_path, digits_teacher):
    """pyproject's core dependencies (torch, safetensors, numpy, pillow) serve an inference team: dtrain export,
    dtrain sample and load_bundle run with every package of the `train` extra missing; dtrain fit says what to
    install, in one line (exit 2)."""
    from dtrain.cli import TRAIN_EXTRA

    code = BLOCKER + f"""
from dtrain.cli import main
import contextlib, io
rc = {{}}
rc["export"] = main(["export", sys.argv[1], "--out", sys.argv[3] + "/b"])
rc["sample"] = main(["sample", sys.argv[3] + "/b", "--num", "4", "--nfe", "2", "--out", sys.argv[3] + "/g.png"])
err = io.StringIO()
with contextlib.redirect_stderr(err):
    rc["fit"] = main(["fit", {str(ROOT / "recipes" / "teacher" / "gmm.yaml")!r}, "--dry-run"])
rc["fit_err"] = err.getvalue().strip()
print(json.dumps(rc))
"""
    res = _run(code, str(digits_teacher), json.dumps(sorted(TRAIN_EXTRA)), str(tmp_path))
    assert res["export"] == 0 and res["sample"] == 0 and (tmp_path / "g.png").is_file()
    assert res["fit"] == 2 and res["fit_err"].startswith("dtrain fit: needs ") and "pip install 'dtrain[train]'" in \
        res["fit_err"] and "\n" not in res["fit_err"]
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {d.split(">")[0].split("<")[0].split("=")[0] for d in project["dependencies"]}
    assert core == {"torch", "safetensors", "numpy", "pillow"}
    train = {d.split(">")[0].split("<")[0].split("=")[0] for d in project["optional-dependencies"]["train"]}
    assert set(TRAIN_EXTRA.values()) <= train  # every blocked module belongs to a package of the extra
