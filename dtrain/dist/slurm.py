"""SLURM: the allocation as the trainer's topology, checkpoint + requeue on a signal, ``sbatch`` flags from a recipe.

Under ``srun`` (one task per GPU), ``dtrain fit`` needs no flags: Lightning's ``SLURMEnvironment`` reads the
ranks, ``topology`` takes devices (tasks per node) and nodes from the allocation, and ``Preemption`` handles the
signal ``sbatch --signal=USR1@90`` sends 90 s before the time limit (and on preemption where slurm.conf sets
``SlurmctldParameters=preempt_send_user_signal``): at the next optimizer step every rank agrees, an HPC
checkpoint ``<run>/hpc_ckpt_<n>.ckpt`` is written (after that step's EMA update), rank 0 runs ``scontrol
requeue``, and the requeued job's ``dtrain fit --resume auto`` resumes from it: step, EMA, optimizer, LR schedule
and data position. SIGTERM (a preemption without that setting, ``scancel``, the time limit without
``--signal``; also outside SLURM) gets the same checkpoint without the requeue, within SLURM's ``KillWait``
(30 s by default) before SIGKILL. It replaces Lightning's own handlers: the SLURM one saves from inside the
signal handler, mid-step, on each rank at whatever point it has reached (a collective out of step with the
others can hang, and the EMA can lag a step); the SIGTERM one stops without a checkpoint.

    python tools/slurm_submit.py slurm/multi_node.sbatch recipes/teacher/cifar10.yaml trainer.num_nodes=4 \
        trainer.devices=8
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from dtrain.errors import InputError, check_count

__all__ = ["SlurmJob", "slurm_job", "torchrun", "topology", "plugins", "callbacks", "Preemption", "hpc_path",
           "sbatch_args", "job_layout"]


@dataclass(frozen=True)
class SlurmJob:
    """The SLURM job step this process runs in (from the environment ``srun`` sets)."""

    job_id: str  # "<array job>_<task>" for array jobs (what scontrol requeue takes)
    num_nodes: int
    tasks_per_node: int
    num_tasks: int
    rank: int


def _tasks_per_node(env: dict[str, str] | os._Environ) -> int:
    """``SLURM_NTASKS_PER_NODE``, else the first count of ``SLURM_TASKS_PER_NODE`` ("4(x2)" -> 4)."""
    raw = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    m = re.match(r"\d+", raw)
    return int(m.group()) if m else max(1, int(env["SLURM_NTASKS"]) // int(env.get("SLURM_NNODES", "1")))


def slurm_job(env: dict[str, str] | os._Environ | None = None) -> SlurmJob | None:
    """The job step when launched by ``srun`` / ``sbatch`` (Lightning's rule: not an interactive "bash" job)."""
    env = os.environ if env is None else env
    if "SLURM_NTASKS" not in env or env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    array = env.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{env['SLURM_ARRAY_TASK_ID']}" if array else env.get("SLURM_JOB_ID", "")
    return SlurmJob(job_id=job, num_nodes=int(env.get("SLURM_NNODES", "1")), tasks_per_node=_tasks_per_node(env),
                    num_tasks=int(env["SLURM_NTASKS"]), rank=int(env.get("SLURM_PROCID", "0")))


def torchrun(env: dict[str, str] | os._Environ | None = None) -> bool:
    """Launched by ``torchrun`` (also inside a SLURM job: one ``srun`` task per node, torchrun's processes per GPU):
    torchrun's ranks win over SLURM's, as in Lightning."""
    return "TORCHELASTIC_RUN_ID" in (os.environ if env is None else env)


def topology(devices: Any, num_nodes: int, env: dict[str, str] | None = None) -> tuple[Any, int]:
    """``(devices, num_nodes)`` for the Trainer: torchrun's layout or the SLURM allocation when running under one,
    else the recipe's.

    A recipe that asks for something else gets a warning naming the fields; the job can only use what it was given
    (sbatch --nodes / --ntasks-per-node decide, see ``sbatch_args``; torchrun --nnodes / --nproc-per-node).
    """
    env = os.environ if env is None else env  # type: ignore[assignment]
    if torchrun(env):
        local = int(env.get("LOCAL_WORLD_SIZE", "1"))
        return _given(devices, num_nodes, local, max(1, int(env.get("WORLD_SIZE", "1")) // local),
                      "torchrun launch")
    job = slurm_job(env)
    if job is None:
        return devices, num_nodes
    if job.num_tasks > 1 and "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:
        raise InputError(f"SLURM: the job has {job.num_tasks} tasks but this process is no task of a job step (no "
                         f"SLURM_STEP_ID: the batch script itself); start dtrain fit with srun, as slurm/*.sbatch do, "
                         f"or it waits for {job.num_tasks - 1} rank(s) that never start")
    per_node = env.get("SLURM_NTASKS_PER_NODE")
    if per_node and per_node.isdigit() and int(per_node) * job.num_nodes != job.num_tasks:
        raise InputError(f"SLURM: --ntasks-per-node={per_node} on {job.num_nodes} node(s), but the job has "
                         f"{job.num_tasks} task(s) (SLURM_TASKS_PER_NODE={env.get('SLURM_TASKS_PER_NODE', '?')}): "
                         f"an --ntasks given to sbatch / srun overrode the template's --ntasks-per-node; give "
                         f"--nodes and --ntasks-per-node only")
    if job.tasks_per_node * job.num_nodes != job.num_tasks:  # e.g. SLURM_TASKS_PER_NODE "3,1"
        raise InputError(f"SLURM: {job.num_tasks} task(s) spread unevenly over {job.num_nodes} node(s) "
                         f"({env.get('SLURM_TASKS_PER_NODE', '?')} per node); Lightning needs the same "
                         f"count on every node: submit with --ntasks-per-node (tools/slurm_submit.py does)")
    return _given(devices, num_nodes, job.tasks_per_node, job.num_nodes, "SLURM allocation")


def _given(devices: Any, num_nodes: int, per_node: int, nodes: int, what: str) -> tuple[int, int]:
    """The launcher's layout, with a warning when the recipe asked for another."""
    asked_devices = devices if isinstance(devices, int) else len(devices) if isinstance(devices, list | tuple) else None
    if asked_devices not in (None, -1, per_node) or num_nodes not in (1, nodes):
        unit = "process(es)" if what == "torchrun launch" else "task(s)"
        warnings.warn(f"trainer.devices={devices}, trainer.num_nodes={num_nodes}: the {what} has {per_node} {unit} "
                      f"per node on {nodes} node(s); using that", stacklevel=3)
    return per_node, nodes


def plugins() -> list[Any]:
    """Under SLURM: ``SLURMEnvironment`` without Lightning's signal handler (``Preemption`` takes its place)."""
    if slurm_job() is None or torchrun():  # torchrun's ranks: Lightning's TorchElasticEnvironment
        return []
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)]


def callbacks() -> list[Any]:
    """``[Preemption()]``: a checkpoint on SIGTERM everywhere; under SLURM also on SIGUSR1, then a requeue."""
    return [Preemption(signal.SIGUSR1 if slurm_job() is not None else None)]


def _checkpoint_base() -> type:
    from lightning.pytorch.callbacks import Checkpoint

    return Checkpoint


class Preemption(_checkpoint_base()):  # type: ignore[misc]
    """On SIGTERM or Ctrl-C (SIGINT; a second one stops at once, with no checkpoint), or on ``requeue_signal``
    (SIGUSR1 under SLURM): at the next optimizer step every rank agrees,
    ``<run>/hpc_ckpt_<n>.ckpt`` is written after that step's EMA update and training stops. After the requeue
    signal rank 0 also runs ``scontrol requeue``; after SIGTERM (a preemption, ``scancel``, ``kill``) nothing is
    requeued (SLURM requeues a preempted ``--requeue`` job itself) and ``dtrain fit`` exits with 143 (128 + 15),
    after Ctrl-C with 130.
    Either way ``dtrain fit --resume auto`` continues from the checkpoint.

    A ``Checkpoint`` callback, so Lightning runs it after every other callback of a step (the EMA update
    included). Costs one all-reduce of one int (which signal) per optimizer step under multi-process training, on a
    gloo group in host memory: a flag on the GPU would make the host wait for the GPU every step.
    The SIGTERM handler replaces Lightning's for the training loop (which stops without a checkpoint and
    all-reduces from inside the handler, possibly in the middle of another collective); DataLoader workers outlive
    the signal (``dtrain.data.worker_init``).
    """

    def __init__(self, requeue_signal: int | None = signal.SIGUSR1) -> None:
        self.requeue_signal = requeue_signal
        self.received: int | None = None  # the signal to act on at the next step boundary
        self.saved: str | None = None
        self.saved_step: int | None = None
        self.stopped_by: int | None = None  # the signal that stopped training after its checkpoint
        self.requeued = False  # after the requeue signal: scontrol requeue succeeded (dtrain fit exits 138 if not)
        self._previous: dict[int, Any] = {}
        self._last_step = -1
        self._group: Any = None  # a gloo group for the per-step flag (host memory, even when training is on NCCL)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:  # Ctrl-C twice: stop now, no checkpoint
            raise KeyboardInterrupt
        if self.received is None or self._rank(signum) > self._rank(self.received):  # the requeue keeps the job
            self.received = signum  # going

    def _rank(self, signum: int) -> int:
        """Which signal wins when ranks got different ones (an all-reduce MAX): the requeue, SIGTERM, Ctrl-C."""
        return 3 if signum == self.requeue_signal else 2 if signum == signal.SIGTERM else 1

    def _install(self, signum: int) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous[signum] = signal.signal(signum, self._handler)

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handler:  # Lightning may have restored its own already
                signal.signal(signum, previous)
        self._previous = {}

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit" and self.requeue_signal is not None:  # early: SIGUSR1's default action ends the process
            self._install(self.requeue_signal)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._last_step = trainer.global_step  # a (re)start's first micro-batch is no step boundary
        self._install(signal.SIGTERM)  # after Lightning registered its own handler (Trainer._run)
        self._install(signal.SIGINT)  # Ctrl-C: a checkpoint too (Lightning's own stops without one)
        # Lightning restores at teardown what it found at registration, our setup-time handler included (also after
        # an exception, when no teardown hook runs): make that the handler before ours
        originals = getattr(getattr(trainer, "_signal_connector", None), "_original_handlers", None)
        if isinstance(originals, dict):
            for signum, previous in self._previous.items():
                if originals.get(signum) == self._handler:
                    originals[signum] = previous

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._restore()
        self._close_group()

    def _close_group(self) -> None:
        """Destroy the flag's gloo group (local, not a collective): one left to the interpreter's exit has aborted
        a rank in gloo's teardown after a finished run, failing the job."""
        group, self._group = self._group, None
        if group is not None:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group(group)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._restore()
        self._close_group()

    def pending(self, trainer: Any) -> int | None:
        """The signal any rank got and has not acted on yet, the requeue signal before SIGTERM; None when none did
        (a collective: every rank calls it at the same point)."""
        import torch
        from torch.distributed import ReduceOp

        code = 0 if self.received is None else self._rank(self.received)
        if trainer.world_size > 1:  # ranks get SLURM's signal at slightly different moments
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():  # on the host: no GPU sync in every step
                if self._group is None:  # every rank comes here at the same first step boundary
                    self._group = dist.new_group(backend="gloo")
                flag = torch.tensor([code], dtype=torch.int64)
                dist.all_reduce(flag, op=ReduceOp.MAX, group=self._group)
                code = int(flag)
            else:
                code = int(trainer.strategy.reduce(torch.tensor(code, device=trainer.strategy.root_device),
                                                   reduce_op=ReduceOp.MAX))
        return None if code == 0 else self.requeue_signal if code == 3 else (signal.SIGINT, signal.SIGTERM)[code - 1]

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self._last_step:  # inside gradient accumulation: not a step boundary
            return
        self._last_step = trainer.global_step
        signum = self.pending(trainer)
        if signum is None:
            return
        if 0 < trainer.max_steps <= trainer.global_step:  # the run is done: its normal end writes last.ckpt (an
            self.received = None  # HPC checkpoint here left last.ckpt a step behind for good, and a requeue)
            if trainer.is_global_zero:
                print(f"dtrain: {signal.Signals(signum).name} at the last step ({trainer.global_step}): the run ends "
                      f"normally", file=sys.stderr, flush=True)
            return
        path = trainer.strategy.broadcast(str(hpc_path(trainer.default_root_dir)))
        trainer.save_checkpoint(path, weights_only=False)  # the full state: the requeued job resumes from it
        self.saved, self.saved_step, self.stopped_by, self.received = path, trainer.global_step, signum, None
        if trainer.is_global_zero:
            print(f"dtrain: {signal.Signals(signum).name} at step {trainer.global_step}: saved {path}",
                  file=sys.stderr, flush=True)
        if signum == self.requeue_signal:
            self._requeue_job(trainer)
        trainer.should_stop = True

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._after_last_step(trainer)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        # a fit resumed from the last step's checkpoint runs the final sweep here (no loop, no on_train_end)
        self._after_last_step(trainer)

    def _after_last_step(self, trainer: Any) -> None:
        """A signal that cut short the work after the last step (a callback's ``cut_short``: the final FID sweep)
        leaves the job unfinished: requeued on the requeue signal, else ``dtrain fit`` exits 128 + signal, and
        ``--resume auto`` from the final checkpoint redoes that work. Runs after the other callbacks' hook (Lightning
        orders checkpoint callbacks last); every rank, as the sweep."""
        if self.stopped_by is not None or not any(getattr(c, "cut_short", False) for c in trainer.callbacks):
            return
        signum = self.pending(trainer)
        if signum is None:
            return
        last = getattr(trainer.checkpoint_callback, "last_model_path", "") or "checkpoints/last.ckpt"
        self.saved, self.saved_step, self.stopped_by, self.received = last, trainer.global_step, signum, None
        if trainer.is_global_zero:
            print(f"dtrain: {signal.Signals(signum).name} after the last step cut short the final evaluation; the "
                  f"checkpoint {last} holds the finished training", file=sys.stderr, flush=True)
        if signum == self.requeue_signal:
            self._requeue_job(trainer)

    def _requeue_job(self, trainer: Any) -> None:
        """Rank 0 runs ``scontrol requeue``; every rank learns whether it succeeded (``requeued``)."""
        self.requeued = bool(trainer.strategy.broadcast(_requeue() if trainer.is_global_zero else False))

    def state_dict(self) -> dict[str, Any]:
        return {}


def hpc_path(root: str | Path) -> Path:
    """``<root>/hpc_ckpt_<n>.ckpt`` with n one past the newest (the name Lightning resumes from under SLURM)."""
    names = (re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name) for p in Path(root).glob("hpc_ckpt_*"))
    nums = [int(m.group(1)) for m in names if m]
    return Path(root) / f"hpc_ckpt_{max(nums, default=0) + 1}.ckpt"


def _requeue() -> bool:
    """``scontrol requeue`` of this job; whether it succeeded (said on stderr either way)."""
    job = slurm_job()
    if job is None or not re.fullmatch(r"[0-9_]+", job.job_id):
        print(f"dtrain: not requeued: no SLURM job id ({job})", file=sys.stderr)
        return False
    try:
        r = subprocess.run(["scontrol", "requeue", job.job_id], capture_output=True, text=True, timeout=60)
        ok, msg = r.returncode == 0, f"scontrol requeue failed ({r.returncode}): {r.stderr.strip()}"
    except (OSError, subprocess.TimeoutExpired) as e:
        ok, msg = False, f"scontrol requeue failed: {e}"
    print(f"dtrain: SLURM job {job.job_id} {'requeued' if ok else msg}", file=sys.stderr, flush=True)
    return ok


# ---- sbatch flags from a recipe ------------------------------------------------------------------------------
def sbatch_args(cfg: Any, *, nodes: int | None = None, gpus_per_node: int | None = None) -> list[str]:
    """``--nodes --ntasks-per-node [--gpus-per-node]`` for a recipe: one task per device (``trainer.devices``,
    ``trainer.num_nodes``); GPUs unless ``trainer.accelerator`` is cpu. Arguments override the recipe."""
    nodes, per_node = job_layout(cfg, nodes=nodes, gpus_per_node=gpus_per_node)
    gpus = 0 if cfg.trainer.accelerator == "cpu" else per_node
    return [f"--nodes={nodes}", f"--ntasks-per-node={per_node}", f"--gpus-per-node={gpus}"]


def job_layout(cfg: Any, *, nodes: int | None = None, gpus_per_node: int | None = None) -> tuple[int, int]:
    """(nodes, tasks per node) of a SLURM job for a recipe (``sbatch_args``; ranks = their product)."""
    t = cfg.trainer
    cpu = t.accelerator == "cpu"
    key = "--gpus-per-node" if gpus_per_node is not None else "trainer.devices"
    per_node = gpus_per_node if gpus_per_node is not None else t.devices
    if isinstance(per_node, str) and "," in per_node:  # Lightning's "0,1": device ids
        per_node = [d for d in per_node.split(",") if d.strip()]
    elif isinstance(per_node, str) and per_node.strip().isdigit():  # "4": a count, as Lightning reads it
        per_node = int(per_node)
    if not isinstance(per_node, int | str):  # a list of device ids
        per_node = len(per_node)
    if per_node in ("auto", -1, "-1") and key == "trainer.devices":
        if not cpu:
            raise InputError(f"trainer.devices is {per_node!r} (all GPUs): set it to the GPUs per node "
                             f"(or pass --gpus-per-node)")
        per_node = 1
    per_node = check_count(per_node, key, "or 'auto', or device ids '0,1'" if key == "trainer.devices" else "")
    nodes = check_count(nodes if nodes is not None else t.num_nodes, "--nodes" if nodes is not None else
                        "trainer.num_nodes")
    return nodes, per_node


