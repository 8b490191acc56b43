"""A real two-node SLURM cluster for the session (``slurm_cluster.py``), and helpers to submit and wait for jobs.

Skips the SLURM tests, with the reason, only where slurm-wlm / munge are missing and cannot be installed (no
root, no apt-get, or apt-get fails); a cluster that is installed but does not start fails them, with its logs.
Jobs run this checkout with this interpreter (``DTRAIN="<python> -m dtrain.cli"``), from the repository root,
with ``MASTER_ADDR=127.0.0.1`` (the node names n1 / n2 resolve nowhere).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import Cluster, Unavailable

ROOT = Path(__file__).resolve().parents[2]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


@dataclass
class Slurm:
    cluster: Cluster
    env: dict[str, str]

    def run(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)

    def sbatch(self, *args: str) -> str:
        """Submit; returns the job id."""
        r = self.run("sbatch", "--parsable", *args)
        assert r.returncode == 0, f"sbatch {' '.join(args)}: {r.stderr}"
        return r.stdout.strip().splitlines()[-1].split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, NodeList, ExitCode, ...)."""
        r = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout))

    def running_until(self, job_id: str, path: Path, log: Path, timeout: float = 150) -> None:
        """Poll until ``path`` exists (e.g. a checkpoint: training is under way); fail if the job ends first."""
        deadline = time.monotonic() + timeout
        while not path.exists():
            info = self.job(job_id)
            assert time.monotonic() < deadline and info.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), (
                info, log.read_text(errors="replace")[-3000:] if log.exists() else "")
            time.sleep(0.1)

    def wait(self, job_id: str, timeout: float, log: Path | None = None) -> dict[str, str]:
        """Poll until the job ends; on timeout cancel it (sbatch --wait would not) and fail with the logs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in TERMINAL:
                return info
            time.sleep(0.5)
        self.run("scancel", job_id)
        text = log.read_text(errors="replace")[-4000:] if log is not None and log.is_file() else ""
        pytest.fail(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout} s\n{text}"
                    f"{self.cluster.logs()}")


DIST_ENV = ("MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> Slurm:
    root = tmp_path_factory.mktemp("slurm")
    cluster = Cluster(root)
    try:
        cluster.start()
    except Unavailable as e:
        pytest.skip(f"no SLURM cluster: {e}")
    except BaseException:
        cluster.stop()
        raise
    # jobs inherit the submitter's environment: drop what an earlier in-process DDP test left in os.environ (Lightning
    # sets MASTER_PORT, WORLD_SIZE, ... there), or every job rendezvouses on that one port (EADDRINUSE)
    env = {k: v for k, v in cluster.env.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "TORCHELASTIC_", "PL_")) and k not in DIST_ENV}
    env.update(SLURM_CONF=str(cluster.conf), MASTER_ADDR="127.0.0.1", DTRAIN=f"{sys.executable} -m dtrain.cli",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1",
               WANDB_MODE="offline")
    try:
        yield Slurm(cluster, env)
    finally:
        cluster.stop()
