"""Fault injection: for each kind of fault, how often dtrain survives it and how many samples it loses.

    python benchmarks/faults.py                    # writes benchmarks/results/faults.json (~5-8 min on 2 CPU cores)
    python benchmarks/faults.py --trials 2 --out /tmp/faults.json

Every run is a real ``dtrain fit`` (a subprocess where the fault is a process kill, else in-process) on a small
recipe in deterministic CPU mode with 1 thread. Per fault kind the json has ``tried``, ``survived`` and
``lost_samples`` (training samples whose update never reached the final weights), plus what "survived" means:

- sigkill_training / sigkill_shard_stream / sigkill_dataloader_worker: the process (or one DataLoader worker) is
  SIGKILLed at a random step; survived = ``dtrain fit --resume auto`` ends with the uninterrupted run's weights, EMA,
  optimizer and LR state (max abs difference <= 1e-6; lost 0: the steps after the last checkpoint are redone).
- sigkill_checkpoint_write: a process rewriting an 8 MB checkpoint in a loop is SIGKILLed at a random moment;
  survived = the file under the checkpoint's name is a complete version. The same with a plain ``torch.save`` to the
  final name is the control (``sigkill_checkpoint_write_plain``).
- truncated_checkpoint: the newest checkpoints are cut at a random byte; survived = resume detects it, names it and
  continues from the previous good one to the uninterrupted run's weights (one full resume, the other trials probe).
- nan_loss / inf_gradient: NaN in a batch or inf in a gradient at random steps; survived = the run completes with
  finite weights and every bad step skipped and counted; lost = the skipped batches' samples.
- nan_persistent: NaN from a random step on; survived = the run stops with ``NonFiniteError`` naming the step after
  ``trainer.max_bad_steps`` (a clean, explained stop is the right outcome here).
- corrupt_members / missing_shard_midrun: undecodable PNGs in a shard, or a shard deleted mid-run (2 workers);
  survived = the run completes and ``data/bad_samples`` equals the samples that could not be read (= lost).
- bad_recipe: the table of tests/unit/test_bad_recipes.py; survived = rejected before anything starts, naming the
  file, the key and the reason.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine  # (common puts the repository on sys.path)

RESULTS = ROOT / "benchmarks" / "results"
GMM = ROOT / "recipes" / "teacher" / "gmm.yaml"
QUIET = ["trainer.cpu_threads=1", "trainer.progress_bar=false", "logger.mode=disabled", "trainer.deterministic=true"]
GMM_ARGS = ["model.hidden=16", "model.depth=1", "data.batch_size=32", "data.num_samples=1024",
            "trainer.ckpt_every_n_steps=10", "trainer.max_steps=120", "optim.warmup_steps=10"]


# the shared tiny digits teacher on shards (also in tests/e2e/test_crash_resume.py, test_data_faults.py)
TINY_BASES = f"[{ROOT / 'recipes' / '_base' / 'train.yaml'}, {ROOT / 'recipes' / '_base' / 'tiny_wds_digits.yaml'}]"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def _cmd(recipe: Path, out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "dtrain.cli", "fit", str(recipe), f"out_dir={out}", *QUIET, *args]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)


def _steps(d: Path) -> list[int]:
    return sorted(int(p.stem[4:]) for p in d.glob("step*.ckpt"))


def max_diff(a: dict, b: dict) -> float:
    """Largest absolute difference over weights, EMA, AdamW state; inf when step or LR state differ."""
    if a["global_step"] != b["global_step"] or a["lr_schedulers"] != b["lr_schedulers"]:
        return math.inf
    d = 0.0
    for k, v in a["state_dict"].items():
        d = max(d, float((v.double() - b["state_dict"][k].double()).abs().max()))
    oa, ob = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in oa:
        for k in oa[i]:
            d = max(d, float((oa[i][k].double() - ob[i][k].double()).abs().max()))
    return d


def _last(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


# ---- process kills --------------------------------------------------------------------------------------------
def _wait_for_checkpoints(proc: subprocess.Popen, ckpts: Path, n: int = 2) -> float:
    """Seconds per step, measured between the first two checkpoints."""
    seen: dict[int, float] = {}
    deadline = time.time() + 300
    while len(seen) < n:
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"run ended or stalled before its checkpoints: {proc.stderr.read()[-2000:]}")
        for s in _steps(ckpts):
            seen.setdefault(s, time.time())
        time.sleep(0.005)
    (s0, t0), (s1, t1) = sorted(seen.items())[:2]
    return max(t1 - t0, 1e-3) / (s1 - s0)


def kill_trial(recipe: Path, args: list[str], name: str, max_steps: int, ref: dict, tmp: Path, rng: random.Random,
               target: str) -> dict[str, Any]:
    """SIGKILL the trainer (``target="main"``) or one of its DataLoader workers at a random step; resume; compare."""
    import psutil

    out = tmp / f"crash{rng.randrange(10**9)}"
    ckpts = out / name / "checkpoints"
    proc = subprocess.Popen(_cmd(recipe, out, *args), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        sps = _wait_for_checkpoints(proc, ckpts)
        time.sleep(rng.uniform(0.0, 0.6) * (max_steps - max(_steps(ckpts))) * sps)
        t_kill = time.time()
        if target == "main":
            proc.send_signal(signal.SIGKILL)
        else:
            workers = psutil.Process(proc.pid).children(recursive=True)
            if not workers:
                raise RuntimeError("no DataLoader worker to kill")
            os.kill(rng.choice(workers).pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)  # a hang fails here
        detect_s = time.time() - t_kill
    finally:
        if proc.poll() is None:
            proc.kill()
    last = max(_steps(ckpts))
    rec: dict[str, Any] = {"returncode": proc.returncode, "last_checkpoint": last, "exit_s": round(detect_s, 2)}
    if target != "main":
        rec["error"] = next((ln.strip() for ln in err.splitlines() if "killed by signal" in ln), err.strip()[-200:])
    if proc.returncode == 0:
        rec.update(survived=False, note="finished before the kill")
        return rec
    r = _run(_cmd(recipe, out, *args, "--resume", "auto"))
    diff = max_diff(ref, _last(out / name)) if r.returncode == 0 else math.inf
    rec.update(resumed_rc=r.returncode, max_abs_diff=diff, survived=diff <= 1e-6)
    return rec


def wds_recipe(tmp: Path) -> tuple[Path, int]:
    from dtrain.cli import main

    shards = tmp / "digit_shards"
    if not (shards / "index.json").is_file():
        assert main(["shards", "digits", "--split", "all", "--out", str(shards), "--num-shards", "6",
                     "--quiet"]) == 0
    p = tmp / "wds_digits.yaml"
    p.write_text(f"""base: {TINY_BASES}
name: wds-digits
data: {{name: wds, shards: {shards / 'index.json'}, batch_size: 32, num_workers: 2, shuffle: 64, flip: true}}
model: {{dropout: 0.1}}
method: {{cfg_dropout: 0.1}}
optim: {{lr: 1.0e-3, warmup_steps: 5, lr_schedule: cosine}}
ema: {{decays: [0.99], stds: [0.1]}}
trainer: {{max_steps: 80, ckpt_every_n_steps: 10, sample_every_n_steps: 0}}
""")
    return p, 80


def bench_kills(tmp: Path, trials: int, rng: random.Random) -> dict[str, Any]:
    res: dict[str, Any] = {}
    ref_dir = tmp / "gmm_ref"
    assert _run(_cmd(GMM, ref_dir, *GMM_ARGS)).returncode == 0
    ref = _last(ref_dir / "teacher-gmm")
    runs = [kill_trial(GMM, GMM_ARGS, "teacher-gmm", 120, ref, tmp, rng, "main") for _ in range(trials)]
    res["sigkill_training"] = _summary(runs, lost=0, what="GMM teacher, in-memory data, 120 steps, ckpt every 10")
    recipe, steps = wds_recipe(tmp)
    ref_dir = tmp / "wds_ref"
    r = _run(_cmd(recipe, ref_dir))
    assert r.returncode == 0, r.stderr[-2000:]
    ref = _last(ref_dir / "wds-digits")
    runs = [kill_trial(recipe, [], "wds-digits", steps, ref, tmp, rng, "main") for _ in range(max(1, trials // 2))]
    res["sigkill_shard_stream"] = _summary(runs, lost=0, what="digits UNet on 6 shards, 2 workers, 80 steps "
                                                               "(epoch end at 56), ckpt every 10")
    runs = [kill_trial(recipe, [], "wds-digits", steps, ref, tmp, rng, "worker") for _ in range(max(1, trials // 2))]
    res["sigkill_dataloader_worker"] = _summary(runs, lost=0, what="one DataLoader worker of the shard run killed "
                                                                    "(an OOM kill); the run exits, then resumes")
    return res


def _summary(runs: list[dict], *, lost: int | None, what: str) -> dict[str, Any]:
    ok = sum(bool(r.get("survived")) for r in runs)
    return {"tried": len(runs), "survived": ok, "lost_samples": lost if ok == len(runs) else None, "setup": what,
            "trials": runs}


# ---- checkpoint writes ------------------------------------------------------------------------------------------
WRITER = """
import sys, torch
from dtrain.lit.checkpointing import atomic_save
path, plain, i = sys.argv[1], sys.argv[2] == "plain", 0
while True:
    i += 1
    obj = {"state_dict": {"w": torch.full((2_000_000,), float(i))}, "global_step": i}
    torch.save(obj, path) if plain else atomic_save(obj, path)
    print(i, flush=True)
"""


def bench_checkpoint_writes(tmp: Path, trials: int, rng: random.Random) -> dict[str, Any]:
    from dtrain.export.checkpoint import CheckpointError
    from dtrain.lit.checkpointing import probe_checkpoint

    res = {}
    for mode in ("atomic", "plain"):
        runs = []
        path = tmp / f"write_{mode}" / "last.ckpt"
        path.parent.mkdir(parents=True, exist_ok=True)
        proc = None
        for _ in range(trials):
            proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), mode], env=_env(),
                                    stdout=subprocess.PIPE, text=True)
            proc.stdout.readline()
            time.sleep(rng.uniform(0.0, 0.4))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            try:
                step = probe_checkpoint(path)
                ck = torch.load(path, weights_only=True)
                ok = bool((ck["state_dict"]["w"] == float(step)).all())
            except (CheckpointError, RuntimeError, KeyError):
                ok = False
            runs.append({"survived": ok})
        key = "sigkill_checkpoint_write" + ("" if mode == "atomic" else "_plain")
        what = ("dtrain.lit.checkpointing.atomic_save (temp file + fsync + rename)" if mode == "atomic" else
                "control: torch.save straight to the final name")
        res[key] = {**_summary(runs, lost=0, what=what), "trials": None}
        res[key]["lost_samples"] = 0 if res[key]["survived"] == len(runs) else None
    return res


def bench_truncation(tmp: Path, trials: int, rng: random.Random) -> dict[str, Any]:
    from dtrain.cli import main
    from dtrain.export.checkpoint import CheckpointError
    from dtrain.lit.checkpointing import probe_checkpoint, resume_path

    args = [*QUIET, *[a for a in GMM_ARGS if "max_steps" not in a and "ckpt_every" not in a],
            "trainer.ckpt_every_n_steps=10", "trainer.max_steps=40"]
    out = tmp / "trunc"
    assert main(["fit", str(GMM), *args, f"out_dir={out}"]) == 0
    run = out / "teacher-gmm"
    ref = _last(run)
    cks = run / "checkpoints"
    original = {p: p.read_bytes() for p in cks.glob("*.ckpt")}
    detected = 0
    for _ in range(trials):  # random cut points of last.ckpt: each must be detected
        data = original[cks / "last.ckpt"]
        (cks / "last.ckpt").write_bytes(data[: rng.randrange(len(data))])
        try:
            probe_checkpoint(cks / "last.ckpt")
        except CheckpointError:
            detected += 1
    for name in ("last.ckpt", "step0000040.ckpt"):
        data = original[cks / name]
        (cks / name).write_bytes(data[: rng.randrange(len(data))])
    picked = resume_path(run, "last")
    ok = main(["fit", str(GMM), *args, f"out_dir={out}", "--resume", "last"]) == 0
    diff = max_diff(ref, _last(run)) if ok else math.inf
    return {"truncated_checkpoint": {
        "tried": trials + 1, "survived": detected + int(diff <= 1e-6), "lost_samples": 0,
        "setup": f"{trials} random cuts of last.ckpt probed; one resume with last.ckpt and step 40 cut",
        "resumed_from": picked.name, "max_abs_diff": diff}}


# ---- non-finite steps --------------------------------------------------------------------------------------------
class Inject(L.Callback):
    def __init__(self, steps: set[int], where: str) -> None:
        self.steps, self.where = steps, where

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.where == "x" and trainer.global_step in self.steps:
            batch["x"][0, 0] = math.nan

    def on_before_optimizer_step(self, trainer, module, optimizer):
        if self.where == "grad" and trainer.global_step in self.steps:
            next(module.net.parameters()).grad[0] = math.inf


def bench_nonfinite(tmp: Path, trials: int, rng: random.Random) -> dict[str, Any]:
    from dtrain.lit.fit import fit
    from dtrain.lit.guard import NonFiniteError

    args = [*QUIET, "model.hidden=16", "model.depth=1", "data.batch_size=32", "data.num_samples=1024",
            "trainer.max_steps=60", "trainer.ckpt_every_n_steps=0", "trainer.max_bad_steps=5"]
    res: dict[str, Any] = {}
    for kind, where in (("nan_loss", "x"), ("inf_gradient", "grad")):
        runs, lost = [], 0
        for i in range(trials):
            steps = set(rng.sample(range(60), 4))
            run = fit(GMM, [*args, f"out_dir={tmp / f'{kind}{i}'}"], callbacks=[Inject(steps, where)])
            ck = _last(run)
            finite = all(bool(torch.isfinite(v).all()) for v in ck["state_dict"].values())
            ok = finite and ck["nan_guard"]["total"] == len(steps)
            lost += 32 * ck["nan_guard"]["total"]
            runs.append({"steps": sorted(steps), "skipped": ck["nan_guard"]["total"], "survived": ok})
        res[kind] = {**_summary(runs, lost=lost, what="GMM teacher, 60 steps, 4 random bad steps, batch 32"),
                     "lost_samples": lost}
    runs = []
    for i in range(trials):
        start = rng.randrange(5, 50)
        try:
            fit(GMM, [*args, f"out_dir={tmp / f'persist{i}'}"], callbacks=[Inject(set(range(start, 60)), "x")])
            runs.append({"start": start, "survived": False, "note": "not stopped"})
        except NonFiniteError as e:
            runs.append({"start": start, "survived": str(e).startswith(f"step {start + 4}: "),
                         "message": str(e)[:160]})
    res["nan_persistent"] = _summary(runs, lost=None, what="NaN from a random step on, trainer.max_bad_steps=5")
    return res


# ---- data faults -----------------------------------------------------------------------------------------------
def _data_recipe(tmp: Path, shards: Path, workers: int) -> Path:
    p = tmp / f"wds_{workers}.yaml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(f"""base: {TINY_BASES}
name: faults
out_dir: {tmp / 'runs'}
data: {{name: wds, shards: "{shards}/train-{{000000..000003}}.tar", batch_size: 8, num_workers: {workers}}}
trainer: {{max_steps: 16, ckpt_every_n_steps: 0, log_every_n_steps: 1, cpu_threads: 1, progress_bar: false}}
logger: {{mode: disabled}}
""")
    return p


def _bad_samples(run: Path) -> float:
    with open(run / "csv" / "metrics.csv") as f:
        return [float(r["data/bad_samples"]) for r in csv.DictReader(f) if r.get("data/bad_samples")][-1]


class DeleteShard(L.Callback):
    def __init__(self, path: Path, at: int) -> None:
        self.path, self.at = path, at

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.at and self.path.exists():
            self.path.unlink()


def bench_data(tmp: Path, trials: int, rng: random.Random) -> dict[str, Any]:
    from dtrain.data.shards import from_digits, write_shards
    from dtrain.lit.fit import fit

    def fresh(i: int) -> Path:
        d = from_digits("all")
        d.images, d.labels = d.images[:64], d.labels[:64]
        out = tmp / f"shards{i}_{rng.randrange(10**9)}"
        write_shards(d, out, num_shards=4, shuffle=True, seed=i, progress=False)
        return out

    runs, lost = [], 0
    for i in range(trials):
        shards = fresh(i)
        k = rng.randrange(1, 4)
        path = shards / f"train-{rng.randrange(4):06d}.tar"
        with tarfile.open(path) as tf:
            members = [(ti, tf.extractfile(ti).read()) for ti in tf]
        pngs = rng.sample([ti.name for ti, _ in members if ti.name.endswith(".png")], k)
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as out:
            for ti, data in members:
                out.addfile(ti, io.BytesIO(bytes(len(data)) if ti.name in pngs else data))
        run = fit(_data_recipe(tmp / f"c{i}", shards, 0))
        n = _bad_samples(run)
        lost += int(n)
        runs.append({"corrupt": k, "counted": n, "survived": n == 2 * k})  # 2 epochs
    res = {"corrupt_members": {**_summary(runs, lost=lost, what="64 digits in 4 shards, 1-3 PNGs zeroed, 2 epochs"),
                               "lost_samples": lost}}
    runs, lost = [], 0
    for i in range(trials):
        shards = fresh(100 + i)
        gone = shards / f"train-{rng.randrange(4):06d}.tar"
        t0 = time.time()
        try:
            run = fit(_data_recipe(tmp / f"m{i}", shards, 2), callbacks=[DeleteShard(gone, rng.randrange(1, 6))])
            n = _bad_samples(run)
            ok = 16 <= n <= 32
        except Exception as e:  # a crash would count as not survived
            n, ok = None, False
            print(f"missing shard trial {i}: {type(e).__name__}: {e}")
        lost += int(n or 0)
        runs.append({"counted": n, "seconds": round(time.time() - t0, 1), "survived": ok})
    res["missing_shard_midrun"] = {**_summary(runs, lost=lost, what="a 16-sample shard deleted mid-epoch, "
                                                                      "2 workers, 2 epochs"), "lost_samples": lost}
    return res


def bench_recipes(tmp: Path) -> dict[str, Any]:
    from dtrain.config import RecipeError
    from dtrain.lit.fit import fit

    spec = importlib.util.spec_from_file_location("bad_recipes", ROOT / "tests" / "unit" / "test_bad_recipes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    runs = []
    for i, (name, base, body, key, reason) in enumerate(mod.CASES):
        d = tmp / f"recipe{i}"
        d.mkdir()
        (d / "truncated.ckpt").write_bytes(b"PK\x03\x04" + bytes(100))
        p = d / "bad.yaml"
        p.write_text((f"base: [{base}]\n" if base else "") + body % {"tmp": d} + f"out_dir: {d / 'runs'}\n")
        try:
            fit(p)
            ok = False
        except RecipeError as e:
            ok = e.key == key and reason in e.reason and e.source.endswith("bad.yaml") and not (d / "runs").exists()
        runs.append({"case": name, "survived": ok})
    return {"bad_recipe": {**_summary(runs, lost=0, what="tests/unit/test_bad_recipes.py CASES through fit()"),
                           "trials": [r["case"] for r in runs if not r["survived"]] or None}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "faults.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(a.seed)
    t0 = time.time()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for part in (lambda: bench_recipes(tmp), lambda: bench_checkpoint_writes(tmp, 2 * a.trials, rng),
                     lambda: bench_truncation(tmp, 4 * a.trials, rng), lambda: bench_nonfinite(tmp, a.trials, rng),
                     lambda: bench_data(tmp, a.trials, rng), lambda: bench_kills(tmp, a.trials, rng)):
            results.update(part())
            print(json.dumps({k: {x: v[x] for x in ("tried", "survived", "lost_samples")}
                              for k, v in results.items()}), flush=True)
    out = {"command": f"python benchmarks/faults.py --trials {a.trials} --seed {a.seed}", "machine": machine(),
           "seconds": round(time.time() - t0, 1), "faults": results}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"wrote {a.out} in {out['seconds']} s")


if __name__ == "__main__":
    main()
