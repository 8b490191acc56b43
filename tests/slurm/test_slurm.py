"""The shipped sbatch templates on a real two-node SLURM cluster (conftest.py), CPU and gloo:

- slurm/multi_node.sbatch, submitted by tools/slurm_submit.py with the node and task counts of the recipe:
  a 2-node x 1-task DDP teacher job; both ranks trained (one per node) and the checkpoint exists.
- slurm/single_node.sbatch with two tasks and a recipe that names no devices (``dtrain fit`` takes them from the
  allocation): signalled with SIGUSR1 mid-run (what ``--signal=USR1@90`` sends before the time limit), it
  saves an HPC checkpoint, requeues itself and resumes: global step, optimizer and EMA continue exactly.
- the same template preempted the way ``PreemptMode=REQUEUE`` does it (``scontrol requeue``: SIGTERM to every
  process of the job, DataLoader workers included, SIGKILL after ``KillWait``): the HPC checkpoint is written at
  the next step all the same and the requeued job resumes from it.
- slurm/eval_array.sbatch: an array job, one FID-vs-NFE point per task.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
GMM = ROOT / "recipes" / "teacher" / "gmm.yaml"
CPU = ["trainer.accelerator=cpu", "trainer.progress_bar=false", "trainer.cpu_threads=1", "logger.mode=disabled",
       "model.hidden=32", "model.depth=2", "data.batch_size=64", "data.num_samples=4096", "strategy.name=ddp",
       "ema.decays=[0.99]"]
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def multi_node(slurm, tmp_path_factory) -> tuple[Path, str, dict[str, str]]:
    """(run directory, job log, scontrol info) of the 2-node job."""
    out = tmp_path_factory.mktemp("multinode")
    log = out / "job.out"
    r = slurm.run(sys.executable, "tools/slurm_submit.py", "slurm/multi_node.sbatch", str(GMM), f"out_dir={out}",
                  *CPU, "trainer.num_nodes=2", "trainer.devices=1", "trainer.max_steps=30",
                  f"--sbatch=--parsable --cpus-per-task=1 --time=5 --output={log}")
    assert r.returncode == 0, r.stderr
    assert "--nodes=2 --ntasks-per-node=1 --gpus-per-node=0" in r.stdout  # from the recipe
    job = r.stdout.strip().splitlines()[-1]
    info = slurm.wait(job, 240, log)
    return out / "teacher-gmm", log.read_text(errors="replace"), info


def test_multi_node_ddp_job_trains_on_both_nodes(multi_node):
    run, log, info = multi_node
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert info["NumNodes"] == "2" and info["NodeList"] == "n[1-2]"
    for rank in (0, 1):  # srun --label: one task per node, each joined the process group and finished fit
        assert f"{rank}: Initializing distributed: GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in log, log[-3000:]
        assert f"{rank}: run directory: {run}" in log
    assert "0: `Trainer.fit` stopped: `max_steps=30` reached." in log
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 30 and ckpt["dtrain"]["kind"] == "teacher"
    init = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["dtrain"]["recipe"]
    assert init["trainer"]["num_nodes"] == 2


def test_requeue_resumes_step_optimizer_and_ema(slurm, tmp_path):
    """SIGUSR1 -> HPC checkpoint at step k (after its EMA update) -> scontrol requeue -> the job restarts and
    resumes: the checkpoint of step k + 1, written after the restart, has EMA_{k+1} = lerp(EMA_k, net_{k+1}, 0.01)
    from the HPC checkpoint's EMA_k, Adam's step count k + 1, and the run ends at max_steps."""
    log = tmp_path / "job.out"
    steps = 40
    job = slurm.sbatch("--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=5",
                       f"--output={log}", "slurm/single_node.sbatch", str(GMM), f"out_dir={tmp_path}", *CPU,
                       f"trainer.max_steps={steps}", "trainer.ckpt_every_n_steps=1")
    run = tmp_path / "teacher-gmm"
    slurm.running_until(job, run / "checkpoints" / "step0000005.ckpt", log)  # training is under way
    r = slurm.run("scancel", "--signal=USR1", job)
    assert r.returncode == 0, r.stderr
    info = slurm.wait(job, 240, log)
    text = log.read_text(errors="replace")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-3000:]
    assert f"dtrain: SLURM job {job} requeued" in text
    assert "restart 0 on n1" in text and "restart 1 on n1" in text
    hpc = sorted(run.glob("hpc_ckpt_*"))
    assert [p.name for p in hpc] == ["hpc_ckpt_1.ckpt"]
    assert f"Restoring states from the checkpoint path at {hpc[0]}" in text

    saved = torch.load(hpc[0], weights_only=True)
    k = saved["global_step"]
    assert 5 <= k < steps
    after = torch.load(run / "checkpoints" / f"step{k + 1:07d}.ckpt", weights_only=True)
    assert after["global_step"] == k + 1
    assert hpc[0].stat().st_mtime < (run / "checkpoints" / f"step{k + 1:07d}.ckpt").stat().st_mtime
    assert all(p.stat().st_mtime <= hpc[0].stat().st_mtime for p in (run / "checkpoints").glob("step*.ckpt")
               if int(re.search(r"\d+", p.name).group()) <= k)  # nothing before k was trained again
    sd0, sd1 = saved["state_dict"], after["state_dict"]
    nets = [key[4:] for key in sd1 if key.startswith("net.")]
    for name in nets:
        want = torch.lerp(sd0[f"ema.0_99.{name}"], sd1[f"net.{name}"], 1 - 0.99)
        torch.testing.assert_close(sd1[f"ema.0_99.{name}"], want, rtol=0, atol=1e-7)
    gap = max((sd1[f"net.{n}"] - sd1[f"ema.0_99.{n}"]).abs().max().item() for n in nets)
    assert gap > 1e-4  # an EMA restarted from the network would miss the tolerance above by far
    assert {int(s["step"]) for s in after["optimizer_states"][0]["state"].values()} == {k + 1}
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == steps


DIGITS = ROOT / "recipes" / "teacher" / "digits.yaml"
TINY_DIGITS = ["trainer.accelerator=cpu", "trainer.progress_bar=false", "trainer.cpu_threads=1", "logger.mode=disabled",
               "strategy.name=ddp", "model.channels=8", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
               "model.attn_resolutions=[]", "data.batch_size=32", "data.num_workers=1", "ema.decays=[0.99]",
               "ema.stds=[]", "trainer.sample_every_n_steps=0", "eval.every_n_steps=0"]


def test_preemption_sigterm_checkpoints_and_the_requeued_job_resumes(slurm, tmp_path):
    """``scontrol requeue`` of a running 2-task job whose ranks read through DataLoader workers: every process gets
    SIGTERM (KillWait=5 s before SIGKILL); both ranks stop at the same step after ``hpc_ckpt_1.ckpt`` is written,
    nothing else requeues, and the restarted job resumes from that step to the end."""
    log = tmp_path / "job.out"
    steps = 60
    job = slurm.sbatch("--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=5",
                       f"--output={log}", "slurm/single_node.sbatch", str(DIGITS), f"out_dir={tmp_path}",
                       *TINY_DIGITS, f"trainer.max_steps={steps}", "trainer.ckpt_every_n_steps=5")
    run = tmp_path / "teacher-digits"
    slurm.running_until(job, run / "checkpoints" / "step0000005.ckpt", log)
    r = slurm.run("scontrol", "requeue", job)
    assert r.returncode == 0, r.stderr
    info = slurm.wait(job, 240, log)
    text = log.read_text(errors="replace")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-3000:]
    hpc = run / "hpc_ckpt_1.ckpt"
    k = torch.load(hpc, weights_only=True)["global_step"]
    assert 5 <= k < steps and f"dtrain: SIGTERM at step {k}: saved {hpc}" in text, text[-3000:]
    assert "exited unexpectedly" not in text and "requeued" not in text  # workers lived; slurm requeued the job
    assert f"Restoring states from the checkpoint path at {hpc}" in text
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == steps


def test_eval_array_job_one_point_per_task(slurm, multi_node, tmp_path):
    from dtrain.data.synthetic import default_gmm
    from dtrain.eval.features import build_extractor
    from dtrain.eval.fid import compute_ref_stats

    x, _ = default_gmm().sample(2000, generator=torch.Generator().manual_seed(3))
    compute_ref_stats(build_extractor("raw", shape=(2,)), x.split(1000), "gmm", sync=False).save(tmp_path / "ref.npz")
    ckpt = multi_node[0] / "checkpoints" / "last.ckpt"
    env_out = tmp_path / "eval"
    slurm.env["EVAL_OUT"] = str(env_out)
    try:
        job = slurm.sbatch("--array=0-1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=5",
                           f"--output={tmp_path}/eval_%a.out", "slurm/eval_array.sbatch", str(ckpt), "ddim:2",
                           "ddim:4,8", "--", "--num", "200", "--batch-size", "100", "--extractor", "raw",
                           "--ref-stats", str(tmp_path / "ref.npz"), "--wandb", "disabled", "--device", "cpu")
    finally:
        del slurm.env["EVAL_OUT"]
    for task in (0, 1):
        info = slurm.wait(f"{job}_{task}", 200, tmp_path / f"eval_{task}.out")
        assert info["JobState"] == "COMPLETED", (tmp_path / f"eval_{task}.out").read_text()[-3000:]
    for spec, nfes in (("ddim_2", [2]), ("ddim_4_8", [4, 8])):
        result = json.loads((env_out / spec / "fid_vs_nfe.json").read_text())
        assert [(r["sampler"], r["nfe"], r["num"]) for r in result["rows"]] == [("ddim", n, 200) for n in nfes]
        assert all(r["fid"] > 0 for r in result["rows"])
