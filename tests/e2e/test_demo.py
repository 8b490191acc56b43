"""``dtrain demo --fast`` as a new user runs it (a subprocess, W&B offline): every artefact is there and loads, the
numbers are sane (finite FIDs, a teacher far better than noise and well above chance at naming classes), a rerun
skips every stage, a stage's validity follows its key and its weights' hashes, and an interrupted training stage
resumes exactly."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dtrain.demo import FAST, STAGES, STUDENTS, TEACHERS, Demo

pytestmark = pytest.mark.slow

MODELS = (*TEACHERS, *(s.name for s in STUDENTS))


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "dtrain.cli", "demo", "--fast", "--out", str(out), *extra], env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = _run(out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    first_summary.update(json.loads((out / "demo.json").read_text()))  # later tests rewrite demo.json
    return out, proc.stdout


first_summary: dict = {}  # the first run's demo.json, whatever order the tests run in


def test_every_artefact_exists_and_loads(demo):
    from PIL import Image

    from dtrain.config import load_recipe
    from dtrain.export.bundle import load_bundle

    out, stdout = demo
    summary = first_summary
    assert summary["stages"] == dict.fromkeys(STAGES, "ran"), summary["errors"]
    index = json.loads((out / "shards" / "index.json").read_text())
    assert index["total"] == 1347 and index["num_classes"] == 10 and len(index["shards"]) == 3
    assert all((out / "shards" / s["name"]).is_file() for s in index["shards"])
    for m in MODELS:
        cfg = load_recipe(out / "recipes" / f"{m}.yaml")  # the written recipe validates as it is
        assert cfg.data.name == "wds" and cfg.name == m
        assert (out / "runs" / m / "checkpoints" / "last.ckpt").is_file()
        assert list((out / "runs" / m / "wandb").glob("offline-run-*")), f"{m}: no offline W&B run"
        pipe = load_bundle(out / "bundles" / m)  # checks the weights' sha256
        x = pipe.sample(4, nfe=min(4, pipe.info["sampler"]["nfe"]), generator=torch.Generator().manual_seed(0))
        assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()
        grid = Image.open(out / "grids" / f"{m}.png")
        assert grid.size[0] == 10 * (8 * 4 + 1) + 1  # one column per class, 8x8 digits shown 4x
    for student in STUDENTS:  # each student distils its teacher's bundle (MeanFlow: the flow teacher's)
        teacher = json.loads((out / "bundles" / student.name / "dtrain.json").read_text())["provenance"]["teacher"]
        assert teacher["format"] == "bundle", student.name
        assert Path(teacher["path"]) == (out / "bundles" / student.teacher).resolve(), student.name
    assert load_recipe(out / "recipes" / "meanflow.yaml").method.init == "teacher"
    assert load_recipe(out / "recipes" / "flow_teacher.yaml").schedule.name == "flow"
    assert list((out / "report" / "wandb").glob("offline-run-*"))
    assert Image.open(out / "fid_vs_nfe.png").size[0] > 200
    md = (out / "results.md").read_text()
    assert all(f"| {m} |" in md for m in MODELS)
    for text in ("FID-digits per NFE", "wandb sync", str(out / "results.md"), str(out / "bundles")):
        assert text in stdout, text
    assert (out / "demo.log").stat().st_size > 0


def test_numbers_are_sane(demo):
    from dtrain.eval.features import build_extractor
    from dtrain.eval.fid import FID, load_ref

    out, _ = demo
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    assert {r["model"] for r in rows} == {"data", *MODELS}
    for r in rows:
        assert math.isfinite(r["fid"]) and r["fid"] >= 0, r
        assert 0.0 <= r["class_acc"] <= 1.0, r
    for t in TEACHERS:
        samplers = {(r["sampler"], r["nfe"]) for r in rows if r["model"] == t}
        assert samplers == {("ddim", 4), ("ddim", 16), ("dpm++2m", 4), ("dpm++2m", 8)}, t
    assert {r["nfe"] for r in rows if r["model"] == "pd"} == {FAST.pd_end}
    # what a sampler that does nothing scores: its starting noise, clipped to the image range (same count, reference)
    ext = build_extractor("digits")
    metric = FID(ext, load_ref("digits:train", ext), shape=(1, 8, 8))
    metric.update(torch.randn(FAST.eval_num, 1, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1))
    noise = metric.compute()["fid"]  # measured: 52.3
    floor = next(r for r in rows if r["model"] == "data")
    assert floor["fid"] < 1.0 and floor["class_acc"] > 0.95  # real held-out digits: the scale's floor
    for t in TEACHERS:
        teacher = [r for r in rows if r["model"] == t]
        best = min(r["fid"] for r in teacher)
        print(f"noise FID {noise:.1f}, real floor {floor['fid']:.3f}, {t} best {best:.2f}, "
              f"class acc {[r['class_acc'] for r in teacher]}")
        assert floor["fid"] < best < noise / 3, t  # measured: teacher 13.2, flow_teacher 14.3 (300 steps)
        assert min(r["class_acc"] for r in teacher) > 0.4, t  # chance is 0.1; measured 0.71-0.89
    # every student starts from its teacher's weights and is far from noise after a few steps (measured: pd 15,
    # cd 29, meanflow 16, ctm 21)
    for s in STUDENTS:
        assert min(r["fid"] for r in rows if r["model"] == s.name) < noise * 0.75, s.name


def test_rerun_skips_every_stage(demo):
    out, _ = demo
    records = {p: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")}
    ckpts = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/checkpoints/last.ckpt")}
    results = (out / "results.json").read_text()
    proc = _run(out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "demo.json").read_text())
    assert summary["stages"] == dict.fromkeys(STAGES, "skipped")
    assert proc.stdout.count("up to date, skipped") == len(STAGES)
    assert len(records) == len(STAGES) and {p: p.stat().st_mtime_ns for p in records} == records
    assert len(ckpts) == len(MODELS) and {p: p.stat().st_mtime_ns for p in ckpts} == ckpts
    assert (out / "results.json").read_text() == results
    assert "FID-digits per NFE" in proc.stdout  # the table is printed again
    proc = _run(out, "--stages", "teacher")  # demo.json said "not selected" of the others, with no timings
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    after = json.loads((out / "demo.json").read_text())
    assert after["stages"] == {**dict.fromkeys(STAGES, "done earlier"), "teacher": "skipped"}
    assert after["timings"].keys() == summary["timings"].keys()
    w = out / "report" / "wandb"  # a --force report cut off after removing its W&B run: the report is redone
    assert Demo(out, sizes=FAST, quiet=True).valid("report") is not None
    w.rename(out / "report" / "gone")
    try:
        assert Demo(out, sizes=FAST, quiet=True).valid("report") is None
    finally:
        (out / "report" / "gone").rename(w)


def test_validity_follows_keys_and_weights(demo):
    """A changed recipe size changes that stage's key (and its dependants'), not its inputs'; a bundle whose
    weights no longer match their sha256 makes its stage, and every stage that needs it, out of date."""
    out, _ = demo
    d = Demo(out, sizes=FAST, quiet=True)
    keys = {s: d.key(s) for s in STAGES}
    assert all(d.valid(s, keys[s]) is not None for s in STAGES)
    d2 = Demo(out, sizes=replace(FAST, cd_steps=FAST.cd_steps + 1), quiet=True)
    assert d2.key("cd") != keys["cd"] and d2.valid("cd", d2.key("cd")) is None
    assert d2.key("teacher") == keys["teacher"] and d2.key("pd") == keys["pd"]
    assert d2.key("eval") is not None and d2.key("eval") != keys["eval"]  # eval scores the students that are valid
    d4 = Demo(out, sizes=replace(FAST, flow_teacher_steps=FAST.flow_teacher_steps + 1), quiet=True)
    assert d4.valid("flow_teacher", d4.key("flow_teacher")) is None and d4.key("meanflow") is None  # input outdated
    assert all(d4.key(s) == keys[s] for s in ("teacher", "pd", "cd", "ctm"))
    assert d4.key("eval") is not None and d4.key("eval") != keys["eval"]  # scored without flow_teacher and meanflow
    weights = out / "bundles" / "teacher" / "model.safetensors"
    blob = weights.read_bytes()
    try:
        weights.write_bytes(blob[:-4] + bytes(b ^ 0xFF for b in blob[-4:]))
        d3 = Demo(out, sizes=FAST, quiet=True)
        assert d3.valid("teacher", keys["teacher"]) is None
        assert d3.key("pd") is None and d3.key("eval") is None  # their input is gone
        assert d3.key("meanflow") == keys["meanflow"]  # it reads the flow teacher, not this one
    finally:
        weights.write_bytes(blob)
    assert Demo(out, sizes=FAST, quiet=True).valid("teacher", keys["teacher"]) is not None


@pytest.mark.parametrize("saved_as", ["checkpoints/last.ckpt", "hpc_ckpt_1.ckpt"])
def test_interrupted_training_resumes_exactly(demo, saved_as):
    """A teacher run cut off after step 250 (its record still 'running'; last.ckpt from step 250, or only a SIGTERM's
    hpc_ckpt_1.ckpt of it) resumes from there and ends with the same weights, bit for bit, so nothing downstream
    reruns."""
    out, _ = demo
    ckpts = out / "runs" / "teacher" / "checkpoints"
    assert (ckpts / "step0000250.ckpt").is_file()
    sha = json.loads((out / "bundles" / "teacher" / "dtrain.json").read_text())["weights"]["sha256"]
    rec_path = out / "stages" / "teacher.json"
    rec = json.loads(rec_path.read_text())
    rec_path.write_text(json.dumps({**rec, "status": "running", "outputs": {}, "digest": ""}))
    (ckpts / "last.ckpt").unlink()
    (out / "runs" / "teacher" / saved_as).write_bytes((ckpts / "step0000250.ckpt").read_bytes())
    proc = _run(out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "resuming the interrupted run from step 250" in proc.stdout
    assert f"/teacher/{saved_as})" in "".join(proc.stdout.split())  # the console may wrap the path
    summary = json.loads((out / "demo.json").read_text())
    assert summary["stages"] == {**dict.fromkeys(STAGES, "skipped"), "teacher": "ran"}
    assert json.loads((out / "bundles" / "teacher" / "dtrain.json").read_text())["weights"]["sha256"] == sha


def test_bad_stage_name_is_one_clear_line(capsys):
    from dtrain.cli import main

    assert main(["demo", "--fast", "--stages", "teachr"]) == 2
    err = capsys.readouterr().err
    assert "--stages: unknown stage 'teachr'" in err and "teacher" in err
