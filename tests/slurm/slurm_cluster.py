"""A real SLURM cluster inside the test machine: munged, slurmctld and two slurmd ("n1", "n2") on 127.0.0.1.

Debian's slurm-wlm + munge (installed with apt-get when missing, as root). Everything lives in one directory
(config, state, spool, logs, munge key and socket); daemons run as root and are stopped by their pid files.
Usable by hand too: ``python tests/slurm/slurm_cluster.py /tmp/slurm`` starts one and prints the environment to use.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

NODES = ("n1", "n2")
PACKAGES = ("slurm-wlm", "munge")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel")


class Unavailable(RuntimeError):
    """SLURM is not installed and cannot be here (the tests skip with this reason)."""


class ClusterError(RuntimeError):
    """SLURM is installed but the cluster does not come up (the tests fail with the daemons' logs)."""


def _which(name: str) -> str | None:
    return shutil.which(name) or next((str(p) for d in ("/usr/sbin", "/usr/bin") if (p := Path(d) / name).is_file()),
                                      None)


def ensure_installed(timeout: float = 200) -> None:
    """apt-get install slurm-wlm munge when a binary is missing; Unavailable when that is not possible."""
    if all(_which(b) for b in BINARIES):
        return
    if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Unavailable("slurm-wlm / munge are not installed and cannot be: installing needs root and apt-get "
                          f"(platform {sys.platform}, uid {os.geteuid()})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", *PACKAGES]  # as verified in shared/ENVIRONMENT.md
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:  # stale package lists: refresh once
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=timeout)
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"apt-get install {' '.join(PACKAGES)} did not finish in {timeout} s") from None
    if r.returncode != 0 or not all(_which(b) for b in BINARIES):
        raise Unavailable(f"apt-get install {' '.join(PACKAGES)} failed: {(r.stderr or r.stdout)[-500:]}")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Cluster:
    """Start with ``start()``, stop with ``stop()``; ``env`` is what clients (sbatch, scontrol) need."""

    def __init__(self, root: str | Path, cpus_per_node: int | None = None) -> None:
        self.root = Path(root).resolve()
        self.cpus = cpus_per_node or max(1, os.cpu_count() or 1)
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._pidfiles: list[Path] = []

    # ---- configuration ------------------------------------------------------------------------------------
    def _write_config(self) -> None:
        ctl, *node_ports = _free_ports(1 + len(NODES))
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        nodes = "\n".join(f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname=127.0.0.1 Port={p} CPUs={self.cpus} "
                          f"State=UNKNOWN" for n, p in zip(NODES, node_ports))
        self.conf.write_text(f"""\
ClusterName=dtraintest
SlurmctldHost={socket.gethostname()}(127.0.0.1)
SlurmctldPort={ctl}
AuthType=auth/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
SwitchType=switch/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
SlurmdTimeout=60
{nodes}
PartitionName=test Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")

    # ---- daemons --------------------------------------------------------------------------------------------
    def _run(self, *cmd: str) -> None:
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed ({r.returncode}): {(r.stderr or r.stdout)[-800:]}"
                               f"{self.logs()}")

    def start(self, timeout: float = 60) -> Cluster:
        ensure_installed()
        self._write_config()
        m = self.root / "munge"
        m.chmod(0o755)
        key = m / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._pidfiles = [m / "munged.pid", self.root / "slurmctld.pid",
                          *(self.root / f"slurmd-{n}.pid" for n in NODES)]
        self._run(_which("munged"), "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                  f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'seed'}")
        self._run(_which("slurmctld"), "-i", "-f", str(self.conf))
        for n in NODES:
            self._run(_which("slurmd"), "-N", n, "-f", str(self.conf))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
            states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
            if r.returncode == 0 and all(states.get(n) == "idle" for n in NODES):
                return self
            time.sleep(0.5)
        raise ClusterError(f"slurm nodes did not become idle in {timeout} s: {r.stdout or r.stderr}{self.logs()}")

    def logs(self, tail: int = 20) -> str:
        out = []
        for f in [*sorted((self.root / "log").glob("*.log")), self.root / "munge" / "munged.log"]:
            if f.is_file():
                out.append(f"\n--- {f.name}:\n" + "\n".join(f.read_text(errors="replace").splitlines()[-tail:]))
        return "".join(out)

    def stop(self) -> None:
        """Cancel every job, then stop the daemons we started (by their pid files) and wait for them to exit."""
        subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True, timeout=30)
        pids = []
        for f in reversed(self._pidfiles):  # slurmd, slurmctld, then munged
            try:
                pid = int(f.read_text().split()[0])
                os.kill(pid, signal.SIGTERM)
                pids.append(pid)
            except (OSError, ValueError, IndexError):
                continue
        deadline = time.monotonic() + 20
        for pid in pids:
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass


if __name__ == "__main__":
    c = Cluster(sys.argv[1] if len(sys.argv) > 1 else "/tmp/dtrain-slurm").start()
    print(f"export SLURM_CONF={c.conf}\n# stop: kill $(cat {c.root}/slurmd-*.pid {c.root}/slurmctld.pid "
          f"{c.root}/munge/munged.pid)")
