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
