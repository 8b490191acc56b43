"""``dtrain fit``: build the datamodule, LightningModule, Trainer, callbacks and W&B logger from a recipe.

The run directory ``<out_dir>/<name>/`` receives the resolved recipe (``recipe.yaml``), checkpoints
(``checkpoints/step0001000.ckpt``, ``checkpoints/last.ckpt``), sample grids (``samples/``) and the W&B
run (``wandb/``; offline runs upload later with ``wandb sync``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import secrets
import signal
import string
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf, read_write

from dtrain.config import RecipeError, check_inputs, key_source, load_recipe, memory_samples, to_container
from dtrain.errors import InputError, check_writable
from dtrain.eval.report import check_wandb_login, logger_mode
from dtrain.fileio import exclusive, write_text
from dtrain.lit.callbacks import SampleGrid, StepCheckpoint
from dtrain.lit.checkpointing import AtomicCheckpointIO, checkpoint_candidates, remove_stale_temps, resume_path
from dtrain.lit.common import DiffusionModule, module_class

__all__ = ["fit", "check_teacher", "per_rank_batch", "run_dir", "build_trainer", "build_logger", "wandb_run_id",
           "describe", "set_cpu_threads", "set_tf32"]


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.out_dir) / cfg.name


def build_logger(cfg: DictConfig, out: Path, *, resume: bool = False) -> Any:
    """WandbLogger with the recipe's project, name, tags and mode; the resolved recipe is the run config.

    ``resume``: the run continues from a checkpoint (``dtrain fit --resume``, a requeued SLURM job); online, it
    logs into the W&B run its first job started (``wandb_run_id``) instead of starting a new one each time.
    Offline jobs get an id each (``wandb sync`` of offline runs sharing an id replaces the history unless given
    ``--append``) and leave the first job's id for the next online one.
    The mode is ``logger_mode(logger.mode)`` (``$WANDB_MODE`` wins). ``disabled`` writes scalars to
    ``<run>/csv/metrics.csv`` instead and never imports wandb
    (clusters or GPU images without it). Lightning's CSV writer deletes an existing ``metrics.csv``: an earlier
    job's (a resumed or requeued run) is kept as ``metrics.1.csv``, ``metrics.2.csv``, ... first.
    """
    lg = cfg.logger
    mode = logger_mode(lg.mode)
    out.mkdir(parents=True, exist_ok=True)
    if mode == "disabled":
        from lightning.fabric.utilities.rank_zero import rank_zero_only
        from lightning.pytorch.loggers import CSVLogger

        old = out / "csv" / "metrics.csv"
        if old.is_file() and getattr(rank_zero_only, "rank", 0) == 0:
            k = 1 + max((int(p.name.split(".")[1]) for p in old.parent.glob("metrics.*.csv")
                         if p.name.split(".")[1].isdecimal()), default=0)
            old.rename(old.with_name(f"metrics.{k}.csv"))
        # the earlier files are kept (above); Lightning's warning says they would be deleted
        warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
        return CSVLogger(str(out), name="csv", version="")
    from lightning.pytorch.loggers import WandbLogger

    run_id = wandb_run_id(out, resume, online=mode == "online")
    return WandbLogger(project=lg.project, name=lg.name or cfg.name, tags=list(lg.tags), mode=mode,
                       save_dir=str(out), config=to_container(cfg), id=run_id, resume="allow",
                       group=cfg.name, job_type="train")  # a run's jobs (resumes, requeues) group together


def wandb_run_id(out: Path, resume: bool, online: bool = True) -> str:
    """The W&B run id of a job in the run directory ``out``. ``<out>/wandb_run_id`` holds the id of the run's first
    job: an online ``resume`` reads it back (a fresh id when the file is missing); an offline resume gets an id of its
    own and leaves the file alone (``wandb sync`` of offline runs sharing an id replaces the history, and the next
    online job still continues the first job's run); a start without resume writes a new one. Written by global
    rank 0 only (other ranks log nothing; under SLURM every rank runs this before the process group exists)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    path = out / "wandb_run_id"
    known = path.read_text().strip() if resume and path.is_file() else ""
    if known and online:
        return known
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id form
    if not known and getattr(rank_zero_only, "rank", 0) == 0:
        write_text(path, run_id + "\n")
    return run_id


def build_trainer(cfg: DictConfig, out: Path, *, logger: Any = None, extra_callbacks: Sequence[L.Callback] = (),
                  resume: bool = False) -> L.Trainer:
    """Trainer (devices, nodes, precision, strategy) + callbacks (checkpoints, LR monitor, progress, grids).

    ``extra_callbacks``: e.g. the datamodule's own (``fit`` passes ``datamodule.callbacks()`` when it has one).
    ``resume``: the run continues from a checkpoint (the W&B run continues too, ``build_logger``).
    """
    from lightning.pytorch.callbacks import LearningRateMonitor, TQDMProgressBar

    from dtrain.dist import slurm  # SLURM's allocation; a checkpoint on SIGTERM (+ requeue on SIGUSR1)
    from dtrain.dist.strategy import build_strategy

    t = cfg.trainer
    devices, num_nodes = slurm.topology(t.devices, t.num_nodes)
    callbacks: list[L.Callback] = [StepCheckpoint(out / "checkpoints", t.ckpt_every_n_steps, t.keep_checkpoints)]
    if logger is not False:  # logger=False: no logging at all (benchmarks, library use)
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if t.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=t.log_every_n_steps))
    if t.sample_every_n_steps > 0:
        callbacks.append(SampleGrid(t.sample_every_n_steps, out / "samples", seed=cfg.seed))
    callbacks += [*extra_callbacks, *slurm.callbacks()]
    return L.Trainer(
        accelerator=t.accelerator,
        devices=devices,
        num_nodes=num_nodes,
        plugins=[*slurm.plugins(), *([] if cfg.strategy.name == "deepspeed" else [AtomicCheckpointIO()])],
        precision=t.precision,
        strategy=build_strategy(cfg),
        max_steps=t.max_steps,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=cfg.optim.grad_clip or None,
        log_every_n_steps=t.log_every_n_steps,
        deterministic=t.deterministic,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        callbacks=callbacks,
        logger=logger if logger is not None else build_logger(cfg, out, resume=resume),
        default_root_dir=str(out),
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )


def set_cpu_threads(n: int) -> None:
    """``trainer.cpu_threads`` > 0: torch's intra-op threads, kept under DDP too (Lightning's DDP sets
    ``cpu_count / processes`` threads unless ``OMP_NUM_THREADS`` is set; spawned ranks inherit it)."""
    if n > 0:
        torch.set_num_threads(n)
        os.environ["OMP_NUM_THREADS"] = str(n)


def set_tf32(enabled: bool) -> bool:
    """``trainer.tf32``: TF32 tensor cores for float32 matmuls and convolutions on NVIDIA GPUs (Ampere and newer);
    returns whether it applied. Without CUDA nothing changes: CPU float32 math stays exact."""
    if not torch.cuda.is_available():
        return False
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled
    return True


def describe(cfg: DictConfig) -> str:
    """The resolved recipe as YAML and the network's parameter count (built on the meta device: no memory)."""
    from dtrain.models import build_model, count_params

    with torch.device("meta"):
        n = count_params(build_model(cfg.model))
    g = cfg.trainer.get("global_batch_size")
    batch = "" if g is None else (f"# data.batch_size: set at launch to trainer.global_batch_size {g} / (ranks x "
                                  f"{cfg.trainer.accumulate_grad_batches} accumulation step(s))\n")
    return f"{OmegaConf.to_yaml(cfg)}# parameters: {n:,} ({cfg.model.name})\n{batch}"


def check_teacher(cfg: DictConfig, source: str = "recipe", overrides: Sequence[str] = ()) -> None:
    """The recipe's ``teacher`` before a run starts (``fit``, ``--dry-run``, ``tools/slurm_submit.py``): given when
    the method needs one, not given when it would be ignored, a denoiser where one is distilled, trained on the
    student's schedule, and the student's network where the student starts from its weights (metadata only; no
    weights are read). Raises ``RecipeError`` naming the key and where it was set."""
    klass = module_class(cfg.method.name)
    if cfg.teacher is None and (why := klass.teacher_needed(cfg)):
        raise RecipeError(source, "teacher", f"{why}: give its checkpoint or bundle, e.g. teacher=runs/<name>/"
                          f"checkpoints/last.ckpt on the command line")
    if cfg.teacher is not None and not klass.reads_teacher(cfg):
        raise RecipeError(key_source("teacher", source, overrides), "teacher",
                          f"method {cfg.method.name!r} with these settings reads no teacher (it would be ignored); "
                          "drop teacher=, or set the method that distils it")
    klass.check_teacher_network(cfg, source, overrides)
    klass.check_teacher_schedule(cfg, source, overrides)
    _check_teacher_null(cfg, source, overrides)


def _check_teacher_null(cfg: DictConfig, source: str, overrides: Sequence[str]) -> None:
    """A student distilled from a teacher's guided predictions (guided PD's ``method.guidance`` range, CD's
    ``method.guidance``) needs a teacher that learned the null class (``learned_null``): without it every target
    is built from a random embedding's prediction."""
    from dtrain.diffusion.guidance import NO_NULL, learned_null
    from dtrain.export.checkpoint import read_recipe

    g = cfg.method.get("guidance")
    ws = [] if g is None else [float(w) for w in g] if isinstance(g, Sequence | ListConfig) else [float(g)]
    if cfg.teacher is None or not Path(cfg.teacher).exists() or all(w == 1.0 for w in ws):
        return
    if learned_null(read_recipe(cfg.teacher)) is False:
        raise RecipeError(key_source("method.guidance", source, overrides), "method.guidance",
                          f"{g} guides the teacher {cfg.teacher}, but {NO_NULL.replace('this model', 'it')}: "
                          f"distil it unguided, or a teacher trained with method.cfg_dropout > 0")


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


def _quiet_lightning_tips() -> None:
    """Lightning logs an advertisement ("Tip: ... try installing litlogger") at every fit; dtrain drops it."""
    lg = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoTips) for f in lg.filters):
        lg.addFilter(_NoTips())


def _check_fresh_start(out: Path, resume: str | None) -> None:
    """A fresh start (no ``--resume``) in a run directory that holds checkpoints is refused: it would have trained
    beside them, and ``last.ckpt``, the file users export and hand on as a teacher, would stay the earlier run's
    (Lightning names the new one ``last-v1.ckpt``). So is one over a PD run's rounds (a run without checkpoints, e.g.
    ``ckpt_every_n_steps: 0``, killed): the earlier rounds would stand beside the new ones as if one run made them."""
    if resume is not None:
        return
    if earlier := checkpoint_candidates(out):
        raise InputError(f"{out} already holds checkpoints of an earlier run (newest: {earlier[0].relative_to(out)}); "
                         f"--resume auto continues it; to start afresh give another name= or out_dir=, or remove "
                         f"{out / 'checkpoints'} first")
    rounds = out / "rounds"
    if rounds.is_dir() and (found := sorted(p.name for p in rounds.iterdir())):
        raise InputError(f"{out} already holds progressive-distillation rounds of an earlier run (rounds/: "
                         f"{', '.join(found[:3])}{', ...' if len(found) > 3 else ''}) and no checkpoint to continue "
                         f"it from (--resume auto starts it over, rewriting them); to start afresh give another "
                         f"name= or out_dir=, or remove {rounds} first")


def _write_recipe(cfg: DictConfig, out: Path) -> None:
    write_text(out / "recipe.yaml", OmegaConf.to_yaml(cfg))  # every rank may write it


def fit(recipe: str | Path | DictConfig, overrides: Sequence[str] = (), *, dry_run: bool = False,
        resume: str | None = None, callbacks: Sequence[L.Callback] = ()) -> Path:
    """Train from a recipe file (+ ``key=value`` overrides); returns the run directory.

    ``resume``: a checkpoint path; ``last``: the run's newest readable checkpoint (``<run>/checkpoints/*.ckpt``,
    SLURM's ``hpc_ckpt_*.ckpt``; truncated files are logged and skipped); ``auto``: the same, or a fresh start
    when the run has none (``dtrain.lit.checkpointing.resume_path``); read with ``weights_only=True``.
    ``callbacks``: extra Lightning callbacks (e.g. the progress display of ``dtrain demo``).
    """
    cfg = recipe if isinstance(recipe, DictConfig) else load_recipe(recipe, overrides)
    source = str(recipe) if not isinstance(recipe, DictConfig) else "recipe"
    out = run_dir(cfg)
    check_writable(out, f"{key_source('out_dir', source, overrides)}: out_dir", directory=True)
    klass: type[DiffusionModule] = module_class(cfg.method.name)
    check_teacher(cfg, source, overrides)
    if dry_run:  # the recipe, then the files a launch would read (not this machine's devices: a login node's)
        print(describe(cfg), end="")
        check_inputs(cfg, source, overrides, here=False)
        if str(cfg.trainer.devices) not in ("auto", "-1"):  # a rank count the recipe fixes: the batch split
            resolve_batch(cfg, source, overrides)
        if resume not in (None, "auto", "last"):
            resume_path(out, resume)  # the file is there and is a checkpoint
        elif resume == "last" and not checkpoint_candidates(out):
            raise FileNotFoundError(f"--resume last: {out} holds no checkpoint yet")
        _check_fresh_start(out, resume)
        return out
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")  # EMA copies, on purpose
    # on a SLURM login node or outside srun: dtrain reads the allocation itself (dtrain.dist.slurm.slurm_job)
    warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not used")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")  # Lightning's
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")  # every resume
    # DeepSpeed: optim.grad_clip goes into its config (gradient_clipping); dtrain's hook is the non-finite guard's
    warnings.filterwarnings("ignore", message=r"Since DeepSpeed handles gradient clipping internally")
    _quiet_lightning_tips()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    set_cpu_threads(int(cfg.trainer.cpu_threads))
    set_tf32(bool(cfg.trainer.tf32))
    check_inputs(cfg, source, overrides)  # before anything starts
    # on every rank, like the checks above: ranks started by srun / torchrun would wait for a rank 0 that stopped
    check_wandb_login(logger_mode(cfg.logger.mode), f"{key_source('logger.mode', source, overrides)}: logger.mode "
                      f"(or WANDB_MODE)")
    cfg, ranks = resolve_batch(cfg, source, overrides)  # before the resume check compares data.batch_size
    _warn_short_ema(cfg)
    _check_fresh_start(out, resume)
    ckpt_path = resume_path(out, resume, recipe=to_container(cfg),  # Lightning's restore reads it once more
                            teacher_target=klass.teacher_target(cfg),
                            method_check=klass.check_resume)  # the method's own checks (PD's rounds, theta^-)
    # one fit per run folder (after the checks: bad input leaves no folder): a second one, e.g. the same job
    # launched twice, would overwrite the first one's checkpoints
    busy = (f"{key_source('out_dir', source, overrides)}: out_dir / name: another dtrain fit is training in {out}; "
            f"wait for it to end, or give this run another name= or out_dir=")
    with exclusive(out / LOCK_FILE, busy) if _first_process() else contextlib.nullcontext():
        return _train(cfg, out, klass, ckpt_path, ranks, callbacks)


LOCK_FILE = ".fit.lock"


def _first_process(env: Any = None) -> bool:
    """Global rank 0 before any process group exists (the launcher's variables: torchrun, srun, Lightning's own
    subprocess launcher), the one that holds the run folder's lock."""
    env = os.environ if env is None else env
    return all(env.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def _train(cfg: DictConfig, out: Path, klass: type[DiffusionModule], ckpt_path: Path | None, ranks: int,
           callbacks: Sequence[L.Callback]) -> Path:
    """``fit`` after its checks, holding the run folder."""
    if _first_process():
        remove_stale_temps(out)
    _write_recipe(cfg, out)
    from lightning.pytorch.utilities import rank_zero_info

    rank_zero_info(f"run directory: {out} ({f'resuming from {ckpt_path}' if ckpt_path else 'a fresh start'})")
    from dtrain.data import build_datamodule

    datamodule = build_datamodule(cfg.data, seed=cfg.seed)
    if hasattr(datamodule, "model_classes"):  # labels of shards without an index are checked against the model
        datamodule.model_classes = int(cfg.model.get("num_classes", 0) or 0)
    module = klass(cfg)
    names = getattr(datamodule, "class_names", None)  # a shard index's: bundles then take labels by name
    if names and len(names) == int(cfg.model.get("num_classes", 0) or 0):
        module.class_names = list(names)
    extra = list(getattr(datamodule, "callbacks", list)())  # a datamodule may bring its own (e.g. data counters)
    extra += list(callbacks)
    if cfg.eval.every_n_steps > 0:
        from dtrain.lit.eval_callback import FIDSweepCallback

        extra.append(FIDSweepCallback.from_recipe(cfg, out_dir=out / "eval"))
    trainer = build_trainer(cfg, out, extra_callbacks=extra, resume=ckpt_path is not None)
    if trainer.num_devices * trainer.num_nodes != ranks:  # resolve_batch counts as Lightning does: else a bug
        raise RuntimeError(f"dtrain counted {ranks} rank(s), Lightning {trainer.num_devices * trainer.num_nodes}")
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
    except BaseException as e:  # the W&B run ends failed (finish() says 0 unless told), then the error goes on
        code = e.code if isinstance(e, SystemExit) else 1
        close_loggers(trainer, exit_code=code if isinstance(code, int) else 1)
        raise
    from dtrain.dist.slurm import Preemption

    stop = next((c for c in trainer.callbacks if isinstance(c, Preemption)), None)
    # stopped early and not requeued (SIGTERM, or a requeue that failed): the job must not look finished (a
    # --dependency=afterok job would start on an unfinished teacher)
    unfinished = stop is not None and stop.stopped_by is not None and not stop.requeued
    code = 128 + (stop.stopped_by or 0) if unfinished and stop is not None else 0
    close_loggers(trainer, exit_code=code)
    if unfinished and stop is not None:  # asked to end: say so, after the checkpoint
        if trainer.is_global_zero:
            how = ("stopped on SIGTERM" if stop.stopped_by == signal.SIGTERM else "stopped on Ctrl-C (SIGINT)"
                   if stop.stopped_by == signal.SIGINT else "the requeue failed")
            print(f"dtrain: {how} at step {stop.saved_step} of {trainer.max_steps}; `dtrain fit ... --resume auto` "
                  f"continues from {stop.saved}", file=sys.stderr, flush=True)
        raise SystemExit(code)
    return out


def _warn_short_ema(cfg: DictConfig) -> None:
    """A teacher's EMA whose copy is still mostly its random initial weights at the end of the run (export and
    eval use the EMA by default): 0.999 averages over ~1000 updates, a 60-step run keeps 94% of the start."""
    if cfg.method.name != "denoising" or not _first_process():  # students start from their teacher's weights (their
        return  # EMA starts there too); one rank says it, not each of them
    updates = int(cfg.trainer.max_steps) // max(1, int(cfg.ema.every))
    for d in cfg.ema.decays or []:
        if (left := float(d) ** updates) > 0.1:
            warnings.warn(f"ema.decays: {d} averages over ~{1 / (1 - float(d)):.0f} updates; after trainer.max_steps="
                          f"{cfg.trainer.max_steps} its copy still holds {left:.0%} of the initial random weights, and "
                          f"export / eval / samples use it by default (--ema raw: the trained weights); a shorter "
                          f"decay or ema.stds (power EMA) suits a run this short", stacklevel=2)


def count_ranks(cfg: DictConfig) -> int:
    """The processes a run of ``cfg`` has here: devices per node (SLURM's tasks per node under SLURM; ``auto`` and
    -1: every CUDA GPU, or one CPU process) times nodes, as Lightning counts them."""
    from dtrain.dist import slurm

    t = cfg.trainer
    devices, nodes = slurm.topology(t.devices, t.num_nodes)
    if str(devices) in ("auto", "-1"):
        gpu = t.accelerator in ("gpu", "cuda") or (t.accelerator == "auto" and torch.cuda.is_available())
        return (torch.cuda.device_count() if gpu else 1) * nodes
    if isinstance(devices, str):  # "2" or device ids "0,1"
        ids = [d for d in devices.split(",") if d.strip()]
        return (len(ids) if "," in devices else int(devices)) * nodes
    return (len(devices) if isinstance(devices, Sequence) else int(devices)) * nodes


def resolve_batch(cfg: DictConfig, source: str = "recipe", overrides: Sequence[str] = ()) -> tuple[DictConfig, int]:
    """``trainer.global_batch_size`` G (when set) -> ``data.batch_size`` = G / (ranks x accumulate_grad_batches),
    so a recipe keeps its paper's batch on any number of GPUs; logs the batch per optimizer step either way (rank
    0). Returns the recipe (a copy when G is set) and the number of ranks."""
    from lightning.pytorch.utilities import rank_zero_info

    ranks, accum = count_ranks(cfg), int(cfg.trainer.accumulate_grad_batches)
    g = cfg.trainer.get("global_batch_size")
    if (per := per_rank_batch(cfg, ranks, source, overrides)) is not None:
        cfg = copy.deepcopy(cfg)
        with read_write(cfg):
            cfg.data.batch_size = per
    b = int(cfg.data.batch_size)
    rank_zero_info(f"batch: {b} per rank x {ranks} rank(s) x {accum} accumulation step(s) = {b * ranks * accum} "
                   f"samples per optimizer step" + (" (trainer.global_batch_size)" if g is not None else ""))
    return cfg, ranks


def per_rank_batch(cfg: DictConfig, ranks: int, source: str = "recipe", overrides: Sequence[str] = ()) -> int | None:
    """``trainer.global_batch_size`` / (``ranks`` x ``accumulate_grad_batches``), or None when it is not set; a
    ``RecipeError`` when they do not divide or in-memory data is too small (``fit``, and ``tools/slurm_submit.py``
    with the job's task count before it queues)."""
    key, accum = "trainer.global_batch_size", int(cfg.trainer.accumulate_grad_batches)
    if (g := cfg.trainer.get("global_batch_size")) is None:
        return None
    if g % (ranks * accum):
        raise RecipeError(key_source(key, source, overrides), key,
                          f"{g} is not a multiple of {ranks} rank(s) x {accum} accumulation step(s) "
                          f"(trainer.accumulate_grad_batches); pick a global batch, GPU count and accumulation "
                          f"that divide, or null to use data.batch_size per rank")
    per = g // (ranks * accum)
    if (n := memory_samples(cfg.data)) is not None and per > n // ranks:
        raise RecipeError(key_source(key, source, overrides), key,
                          f"{g} gives batches of {per} per rank, more than the {n // ranks} samples per rank "
                          f"({n} samples of data {cfg.data.name!r} over {ranks} rank(s))")
    return per


def close_loggers(trainer: L.Trainer, exit_code: int = 0) -> None:
    """Close this run's W&B run (rank 0) with the job's ``exit_code`` (non-zero: the dashboard shows it failed), so a
    later fit in the same process starts its own."""
    for logger in trainer.loggers:
        if trainer.is_global_zero and type(logger).__name__ == "WandbLogger" and logger._experiment is not None:
            logger.experiment.finish(exit_code=exit_code)
