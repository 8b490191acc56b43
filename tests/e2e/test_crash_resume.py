"""Crash-exact resume: `dtrain fit` killed with SIGKILL at a random step, then `dtrain fit --resume auto`, ends with the
uninterrupted run's weights, EMA, optimizer moments, LR schedule and step (deterministic CPU mode), on in-memory data
and on a WebDataset shard stream read by 2 DataLoader workers across an epoch boundary."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"
QUIET = ["trainer.cpu_threads=1", "trainer.progress_bar=false", "logger.mode=disabled", "trainer.deterministic=true"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def _cmd(recipe: Path, out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "dtrain.cli", "fit", str(recipe), f"out_dir={out}", *QUIET, *args]


def _steps(ckpt_dir: Path) -> list[int]:
    return sorted(int(p.stem[4:]) for p in ckpt_dir.glob("step*.ckpt"))


def kill_at_random_step(cmd: list[str], ckpt_dir: Path, every: int, max_steps: int, rng: random.Random) -> int:
    """Start the run, SIGKILL it at a random step past the first checkpoint (the step rate is measured from the
    checkpoint times, so the kill lands mid-run on a slow or a fast machine); returns the last checkpointed step."""
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        seen: dict[int, float] = {}
        deadline = time.time() + 120
        while len(seen) < 2:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, "no checkpoints appeared"
            for s in _steps(ckpt_dir):
                seen.setdefault(s, time.time())
            time.sleep(0.005)
        (s0, t0), (s1, t1) = sorted(seen.items())[:2]
        sec_per_step = max(t1 - t0, 1e-3) / (s1 - s0)
        left = max_steps - s1
        time.sleep(rng.uniform(0.0, 0.6) * left * sec_per_step)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed"
    return max(_steps(ckpt_dir))


def assert_same_state(a: dict, b: dict, tol: float = 1e-6) -> None:
    """Weights + every EMA copy, AdamW moments and step counts, LR scheduler state, global step."""
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys() and any(k.startswith("ema.") for k in a["state_dict"])
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, atol=tol, rtol=0, msg=k)
    oa, ob = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert oa.keys() == ob.keys() and len(oa) > 0
    for i in oa:
        for k in oa[i]:
            torch.testing.assert_close(ob[i][k], oa[i][k], atol=tol, rtol=0, msg=f"optimizer {i}.{k}")
    assert a["lr_schedulers"] == b["lr_schedulers"]


def crash_and_resume(tmp: Path, recipe: Path, args: list[str], name: str, every: int, max_steps: int) -> int:
    rng = random.Random()  # a different kill point every run (printed on failure)
    ref, crash = tmp / "ref", tmp / "crash"
    r = subprocess.run(_cmd(recipe, ref, *args), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpts = crash / name / "checkpoints"
    last = kill_at_random_step(_cmd(recipe, crash, *args), ckpts, every, max_steps, rng)
    assert 0 < last < max_steps
    r = subprocess.run(_cmd(recipe, crash, *args, "--resume", "auto"), env=_env(), cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (torch.load(d / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
            for d in (ref, crash))
    assert a["global_step"] == max_steps
    assert_same_state(a, b)
    return last


@pytest.mark.timeout(300)
def test_sigkill_in_memory_data_resumes_exactly(tmp_path, capsys):
    """GMM teacher, 120 steps, checkpoints every 10, killed somewhere past step 20; EMA 0.99 and a cosine LR."""
    args = ["model.hidden=16", "model.depth=1", "data.batch_size=32", "data.num_samples=1024",
            "trainer.ckpt_every_n_steps=10", "trainer.max_steps=120", "optim.warmup_steps=10"]
    last = crash_and_resume(tmp_path, RECIPES / "teacher" / "gmm.yaml", args, "teacher-gmm", 10, 120)
    print(f"killed after checkpoint {last}")


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory) -> Path:
    from dtrain.cli import main

    out = tmp_path_factory.mktemp("digit_shards")
    assert main(["shards", "digits", "--split", "all", "--out", str(out), "--num-shards", "6", "--quiet"]) == 0
    return out / "index.json"


def wds_recipe(tmp: Path, index: Path) -> Path:
    """The digits teacher on shards: 1797 samples, batches of 32, an epoch of 56 steps."""
    p = tmp / "wds_digits.yaml"
    p.write_text(f"""base: [{RECIPES / '_base' / 'train.yaml'}, {RECIPES / '_base' / 'tiny_wds_digits.yaml'}]
name: wds-digits
data: {{name: wds, shards: {index}, batch_size: 32, num_workers: 2, shuffle: 64, flip: true}}
model: {{dropout: 0.1}}
method: {{cfg_dropout: 0.1}}
optim: {{lr: 1.0e-3, warmup_steps: 5, lr_schedule: cosine}}
ema: {{decays: [0.99], stds: [0.1]}}
trainer: {{max_steps: 80, ckpt_every_n_steps: 10, sample_every_n_steps: 0}}
""")
    return p


@pytest.fixture(scope="module")
def wds_reference(tmp_path_factory, digit_shards) -> tuple[Path, dict]:
    """(recipe, last checkpoint) of the uninterrupted 80-step shard-stream run."""
    tmp = tmp_path_factory.mktemp("wds_ref")
    recipe = wds_recipe(tmp, digit_shards)
    r = subprocess.run(_cmd(recipe, tmp / "ref"), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    last = torch.load(tmp / "ref" / "wds-digits" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 80
    return recipe, last


def _resume_matches(recipe: Path, out: Path, ref: dict) -> str:
    r = subprocess.run(_cmd(recipe, out, "--resume", "auto"), env=_env(), cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_state(ref, torch.load(out / "wds-digits" / "checkpoints" / "last.ckpt", map_location="cpu",
                                      weights_only=True))
    return r.stderr


@pytest.mark.timeout(300)
def test_sigkill_shard_stream_resumes_exactly(tmp_path, wds_reference):
    """Digits UNet (dropout, CFG label dropout, a power EMA) on 6 shards read by 2 workers with shuffling and flips;
    80 steps cross the epoch end at 56; killed past step 20, the resumed run continues at the exact data position."""
    recipe, ref = wds_reference
    last = kill_at_random_step(_cmd(recipe, tmp_path), tmp_path / "wds-digits" / "checkpoints", 10, 80,
                               random.Random())
    assert 0 < last < 80
    _resume_matches(recipe, tmp_path, ref)


@pytest.mark.timeout(300)
def test_sigterm_to_every_process_checkpoints_the_next_step(tmp_path, wds_reference):
    """SIGTERM to the whole process group, DataLoader workers included (what SLURM does on preemption, ``scancel``
    or the time limit): the run writes ``hpc_ckpt_1.ckpt`` at the next step and exits with 143; ``--resume auto``
    continues from that step and ends with the uninterrupted run's state. Without the workers' handler they die
    and the main process fails on its next batch ("DataLoader worker exited unexpectedly") without a checkpoint;
    with Lightning's own SIGTERM handler the run stops without one."""
    recipe, ref = wds_reference
    run = tmp_path / "wds-digits"
    proc = subprocess.Popen(_cmd(recipe, tmp_path), env=_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints" / "step0000010.ckpt").exists():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err[-3000:]
    saved = torch.load(run / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=True)
    k = saved["global_step"]
    assert 10 <= k < 80 and f"dtrain: SIGTERM at step {k}: saved {run / 'hpc_ckpt_1.ckpt'}" in err
    assert max(_steps(run / "checkpoints")) <= k  # stopped right after the checkpoint
    assert f"Restoring states from the checkpoint path at {run / 'hpc_ckpt_1.ckpt'}" in _resume_matches(
        recipe, tmp_path, ref)


@pytest.mark.timeout(300)
def test_resume_from_an_epochs_last_batch_is_exact(tmp_path, digit_shards):
    """A checkpoint on the last batch of a data epoch (step 56 of 56; a requeue can land there): the resumed run
    trains on epoch 1's data next, as the uninterrupted run does (Lightning's epoch counter runs one ahead there)."""
    recipe = wds_recipe(tmp_path, digit_shards)
    args = ["trainer.max_steps=60", "trainer.ckpt_every_n_steps=56"]
    ref, res = tmp_path / "ref", tmp_path / "res"
    r = subprocess.run(_cmd(recipe, ref, *args), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    at_end = ref / "wds-digits" / "checkpoints" / "step0000056.ckpt"
    r = subprocess.run(_cmd(recipe, res, *args, "--resume", str(at_end)), env=_env(), cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (torch.load(d / "wds-digits" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
            for d in (ref, res))
    assert a["global_step"] == 60
    assert_same_state(a, b)
