"""Checkpoints that survive a crash: atomic writes, and the newest readable checkpoint of a run to resume from.

Writes. ``AtomicCheckpointIO`` (the Trainer's checkpoint IO for single-file checkpoints: ``checkpoints/*.ckpt``
and SLURM's ``hpc_ckpt_*.ckpt``) writes ``.<name>.tmp<host>.<pid>.<random>`` in the target's own directory
(``dtrain.fileio.replacing``), flushes and fsyncs it, then renames it over the target (``os.replace``, atomic on
POSIX) and fsyncs the directory. A process killed mid-write leaves the previous file intact plus a stale temp
file (removed by the next ``dtrain fit`` of the run once it holds the run folder: ``remove_stale_temps``).
Lightning's own writer stages the file in the system temp directory and *moves* it, which is a plain copy
(not atomic) whenever that directory is on another filesystem than the run, the usual case on clusters.
Sharded checkpoint directories (DeepSpeed, FSDP ``sharded_checkpoint``) are written by their strategy.

Resume. ``resume_path(run_dir, "auto" | "last" | path)`` probes candidates with ``torch.load(weights_only=True,
mmap=True)`` (the pickled structure is read, tensor data is only mapped): a truncated or unreadable file is
named in the log and the next newest is tried (``last.ckpt``, ``step*.ckpt``, ``hpc_ckpt_*.ckpt``, newest
modification time first). A sharded directory is probed through its metadata (``dtrain.export.zero.sharded_meta``)
after a check that every shard file is there and whole. A path the user names explicitly must itself be readable.
The same read checks the checkpoint against the recipe (``check_resume``); Lightning's restore is the only other
read.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from dtrain.errors import first_line
from dtrain.export.checkpoint import CheckpointError, is_bundle, model_differences, model_section
from dtrain.export.zero import is_sharded_checkpoint, not_sharded, sharded_meta
from dtrain.fileio import TMP_TAG, replacing
from dtrain.models import TRAINING_ONLY

__all__ = ["AtomicCheckpointIO", "atomic_save", "probe_checkpoint", "resume_path",  # noqa: F822 (lazy, below)
           "checkpoint_candidates", "check_model", "check_resume"]

log = logging.getLogger("dtrain.checkpoint")


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temp file beside ``path``, fsync, rename over ``path``: readers see the old file or
    the new one, never a partial one."""
    with replacing(path) as f:
        torch.save(obj, f)


def _atomic_io_class() -> type:
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        """``TorchCheckpointIO`` whose local writes are atomic (``atomic_save``); remote URLs keep Lightning's."""

        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
            if storage_options is not None or "://" in str(path):
                return super().save_checkpoint(checkpoint, path, storage_options)
            atomic_save(checkpoint, path)

    AtomicCheckpointIO.__module__, AtomicCheckpointIO.__qualname__ = __name__, "AtomicCheckpointIO"
    return AtomicCheckpointIO


def __getattr__(name: str) -> Any:
    """``AtomicCheckpointIO`` is built on first use, so ``atomic_save`` and the resume helpers import without
    Lightning (job scripts, tools, a crash-test writer)."""
    if name == "AtomicCheckpointIO":
        cls = globals()["AtomicCheckpointIO"] = _atomic_io_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def probe_checkpoint(path: str | Path, field: str = "") -> int:
    """The global step of a Lightning checkpoint (a file or a sharded directory), or ``CheckpointError`` naming the
    file (and ``field``, the recipe field or flag that gave it) when it is truncated, unreadable with
    ``weights_only=True``, or not a training checkpoint."""
    return int(_probe(Path(path), field)["global_step"])


# the file each sharded format writes last (rank 0, after every shard): DeepSpeed's tag pointer, Lightning's FSDP
# training state; a directory without it is an unfinished save (``StepCheckpoint`` removes it before a rewrite)
SHARDED_DONE = ("latest", "meta.pt")


def _probe(path: Path, field: str) -> dict[str, Any]:
    """``probe_checkpoint``'s read: the checkpoint, its tensors mapped, never read. A sharded directory: its
    metadata (FSDP's ``meta.pt``, DeepSpeed rank 0's client state) with an empty ``state_dict``, once its
    finished-save marker is there and every shard file is there and whole (``sharded_meta(complete=True)``)."""
    if path.is_dir():
        if not is_sharded_checkpoint(path):
            raise CheckpointError(path, field, not_sharded(path))
        try:
            ck = sharded_meta(path, complete=True)
        except CheckpointError as e:  # the file it names, and the flag or field that gave the directory
            raise CheckpointError(e.file, field, e.reason) from None
        if not isinstance(ck.get("global_step"), int):
            raise CheckpointError(path, field, "not a training checkpoint (no global_step in its metadata)")
        return {**ck, "state_dict": {}}
    if not path.is_file():
        raise CheckpointError(path, field, "checkpoint not found")
    if path.stat().st_size == 0:
        raise CheckpointError(path, field, "empty file (0 bytes)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated zip (no central directory), bad pickle, foreign objects
        raise CheckpointError(path, field, f"unreadable (truncated or corrupt?): {type(e).__name__}: "
                              f"{first_line(e)}") from None
    if not isinstance(ck, dict) or "state_dict" not in ck or not isinstance(ck.get("global_step"), int):
        raise CheckpointError(path, field, "not a training checkpoint (no state_dict / global_step)")
    return ck


RESUME_MAY_CHANGE = (*TRAINING_ONLY, "clip_x0")  # model keys a resumed run may change: training, sampling


def check_model(path: str | Path, ckpt: Mapping[str, Any], model: Mapping[str, Any], field: str = "--resume"
                ) -> None:
    """The checkpoint ``ckpt`` (read from ``path`` by ``probe_checkpoint``) was trained with this ``model`` section
    (keys that only affect training noise or sampling aside), else ``CheckpointError`` naming the keys that differ."""
    theirs = model_section(ckpt, path)
    diff = [f"model.{k} {theirs[k]!r} (now {model[k]!r})" for k in model_differences(theirs, model, RESUME_MAY_CHANGE)]
    if diff:
        raise CheckpointError(path, field, f"the checkpoint's network differs from the recipe's: "
                              f"{', '.join(diff)}; resume with the checkpoint's model section, or start a new run")


# optimizer settings Lightning restores from the checkpoint's optimizer state (param_groups, the scheduler's base
# LRs): a changed value would be silently ignored, so a resume refuses it (warmup_steps, lr_schedule, min_lr_ratio
# and grad_clip are read from the recipe and may change)
RESTORED_OPTIM = ("lr", "betas", "weight_decay", "eps")


def check_resume(path: str | Path, ckpt: Mapping[str, Any], recipe: Mapping[str, Any], field: str = "--resume",
                 teacher_target: bool = False) -> None:
    """The checkpoint fits the recipe a run resumes with: the network (``check_model``), the EMA copies it keeps
    (``ema.decays`` / ``ema.stds``), the optimizer settings restored from it (``RESTORED_OPTIM``) and, when the
    teacher sets the training target (``teacher_target``), the same teacher (``check_resume_teacher``); else
    ``CheckpointError`` naming the keys."""
    from dtrain.models.ema import ema_tags

    check_model(path, ckpt, recipe["model"], field)
    meta = ckpt.get("dtrain") or {}
    if teacher_target:
        check_resume_teacher(path, meta, recipe.get("teacher"), field,
                             teacher_ema=(recipe.get("method") or {}).get("teacher_ema", "auto"))
    ema = recipe.get("ema") or {}
    want = sorted(ema_tags(ema.get("decays") or [], ema.get("stds") or []))
    have = sorted(str(t) for t in meta.get("ema_tags") or [])
    if "ema_tags" in meta and have != want:
        raise CheckpointError(path, field, f"the checkpoint keeps EMA copies {have}, the recipe asks for {want} "
                              f"(ema.decays / ema.stds); resume with the checkpoint's ema section, or start a new run")
    theirs, ours = (meta.get("recipe") or {}).get("optim") or {}, recipe.get("optim") or {}
    diff = [f"optim.{k} {theirs[k]!r} (now {ours[k]!r})" for k in RESTORED_OPTIM
            if k in theirs and k in ours and theirs[k] != ours[k]]
    if diff:
        raise CheckpointError(path, field, f"{', '.join(diff)}: a resumed run keeps the optimizer state and settings "
                              f"of its checkpoint, so the new value would be ignored; resume with the checkpoint's "
                              f"values, or start a new run")
    before = meta.get("recipe") or {}
    if before:  # what the network was trained to be: a resume under another one trains something else silently
        from dtrain.diffusion.schedule import schedule_from_config

        changed = [f"{'.'.join(k)} {_get(before, k)!r} (now {_get(recipe, k)!r})"
                   for k in (("method", "name"),) if _get(before, k) != _get(recipe, k)]  # (param: check_model)
        try:
            was, now = (schedule_from_config(r["schedule"]).to_dict() for r in (before, recipe))
        except Exception:  # a schedule the checks at load name
            was = now = None
        if was != now:
            changed.append(f"schedule {was} (now {now})")
        if changed:
            raise CheckpointError(path, field, f"{', '.join(changed)}: the checkpoint was trained for another "
                                  f"objective; resume with its recipe ({path} holds it), or start a new run")
    step, total = ckpt.get("global_step"), (recipe.get("trainer") or {}).get("max_steps")
    was = (before.get("trainer") or {}).get("max_steps")
    per_round = (recipe.get("method") or {}).get("name") == "pd"  # its LR runs per round (a new length: refused)
    if (recipe.get("optim") or {}).get("lr_schedule", "constant") != "constant" and was not in (None, total) \
            and not per_round:
        warnings.warn(f"resume: trainer.max_steps {was} -> {total} under optim.lr_schedule "
                      f"{recipe['optim']['lr_schedule']!r}: the schedule is recomputed over the new length, so the "
                      f"learning rate jumps at step {step} (from its value at {step}/{was} to its value at "
                      f"{step}/{total})", stacklevel=2)
    if isinstance(step, int) and isinstance(total, int) and step > total:  # it ran nothing and said nothing
        raise CheckpointError(path, "trainer.max_steps", f"{total}, but the checkpoint is at step {step} already: "
                              f"a resume trains up to max_steps; give a larger one, or export the checkpoint")
    if (recipe.get("data") or {}).get("name") != "wds" and before:  # shard streams check their own layout
        moved = [f"{'.'.join(k)} {_get(before, k)!r} -> {_get(recipe, k)!r}" for k in _IN_MEMORY_POSITION
                 if _get(before, k) != _get(recipe, k)]
        if moved:
            warnings.warn(f"resume: {', '.join(moved)}: in-memory data restarts after global_step x "
                          f"accumulate_grad_batches batches of the new size and order, so the position in the epoch "
                          f"is approximate", stacklevel=2)


def check_resume_teacher(path: str | Path, meta: Mapping[str, Any], teacher: str | None, field: str = "--resume",
                         teacher_ema: Any = "auto") -> None:
    """A student resumes with the teacher it was trained against: its checkpoint's ``dtrain.teacher`` reference (the
    sha256 of the teacher's file, or of a bundle's weights, and of the teachers that one recorded: a PD round's) must
    hold the recipe's ``teacher`` (a teacher run that kept training rewrote its last.ckpt under the same name), and
    ``teacher_ema`` (``method.teacher_ema``) must read the same copy of it. A sharded teacher directory is not
    compared (its hash needs consolidating)."""
    if "teacher" not in meta:
        return
    ref = meta.get("teacher") or None
    if ref is None and teacher is None:
        return
    if ref is None or teacher is None:
        was = "without a teacher" if ref is None else f"against the teacher {ref.get('path')}"
        raise CheckpointError(path, "teacher", f"{teacher or 'none'}: the checkpoint was trained {was}; a resume "
                              f"with {'one' if ref is None else 'none'} would change its training target mid-run "
                              f"(resume with the same teacher setting, or start a new run)")
    from dtrain.export.bundle import read_info, sha256_file

    t = Path(teacher)
    if ref.get("sha256") is None or (t.is_dir() and not is_bundle(t)):
        return
    now = read_info(t)["weights"]["sha256"] if is_bundle(t) else sha256_file(t) if t.is_file() else None
    chain, link = set(), ref  # the teacher and its own teachers: a PD round's teacher is the last round's student,
    while isinstance(link, Mapping) and len(chain) < 64:  # whose chain leads back to the run's teacher
        chain.add(link.get("sha256"))
        link = link.get("teacher")
    if now is not None and now not in chain and is_bundle(t) and _exported_from(t, ref):
        return  # the bundle of the very weights it trained against, exported from that teacher checkpoint
    if now is not None and now not in chain:
        raise CheckpointError(path, "teacher", f"{teacher} (sha256 {now[:12]}) is not the teacher the checkpoint was "
                              f"trained against ({ref.get('path')}, sha256 {ref['sha256'][:12]}): resuming would "
                              f"change the training target mid-run (a teacher run that kept training rewrites its "
                              f"last.ckpt); give that teacher (a copy of that same file), or start a new run")
    if now is not None and now == ref["sha256"] and "ema" in ref and (held := _teacher_copy(t, teacher_ema)) != (
            was := ref["ema"]) and held is not _UNKNOWN:
        raise CheckpointError(path, "method.teacher_ema", f"{teacher_ema!r} reads the teacher's {held or 'raw'} "
                              f"weights; the checkpoint was trained against its {was or 'raw'} weights: resuming "
                              f"would change the training target mid-run; resume with method.teacher_ema="
                              f"{was or 'raw'}, or start a new run")


_UNKNOWN = object()


def _exported_from(bundle: Path, ref: Mapping[str, Any]) -> bool:
    """``bundle`` holds exactly the weights a student trained against: exported (``provenance.source_sha256``) from
    the teacher checkpoint ``ref`` names, the same EMA copy, in fp32 (the teacher was read in fp32)."""
    from dtrain.export.bundle import read_info

    info = read_info(bundle)
    return (ref.get("format") == "checkpoint" and (info.get("provenance") or {}).get("source_sha256") == ref["sha256"]
            and "ema" in ref and info["weights"].get("ema") == ref["ema"] and info["weights"].get("dtype") == "float32")


def _teacher_copy(teacher: Path, ema: Any) -> Any:
    """The EMA tag (None: raw) ``load_teacher(teacher, ema=ema)`` reads, from metadata only; ``_UNKNOWN`` when
    it cannot tell (loading then names the problem)."""
    from dtrain.export.bundle import read_info
    from dtrain.export.checkpoint import chosen_tag

    try:
        if is_bundle(teacher):  # one copy; another one asked for is refused at load
            return read_info(teacher)["weights"]["ema"]
        return chosen_tag(torch.load(teacher, map_location="cpu", weights_only=True, mmap=True)["dtrain"], ema)
    except Exception:  # an unreadable teacher, or several EMAs and no default: its load names it
        return _UNKNOWN


_IN_MEMORY_POSITION = (("data", "batch_size"), ("seed",), ("trainer", "accumulate_grad_batches"))


def _get(tree: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    for k in keys:
        tree = tree.get(k) if isinstance(tree, Mapping) else None
    return tree


def checkpoint_candidates(run_dir: str | Path) -> list[Path]:
    """A run's checkpoints to resume from, newest first: ``checkpoints/*.ckpt`` and SLURM's ``hpc_ckpt_*.ckpt``."""
    run_dir = Path(run_dir)
    found = [p for p in (*(run_dir / "checkpoints").glob("*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt"))
             if not p.name.startswith(".")]
    return sorted(found, key=lambda p: (_saved_ns(p), p.name == "last.ckpt"), reverse=True)


def _saved_ns(path: Path) -> int:
    """When a checkpoint was saved: a file's modification time; a sharded directory's finished-save marker's (a
    directory rewritten in place, DeepSpeed's and FSDP's ``last.ckpt``, keeps its first save's own time)."""
    if path.is_dir():
        done = [path / n for n in SHARDED_DONE if (path / n).is_file()]
        return max((p.stat().st_mtime_ns for p in done), default=path.stat().st_mtime_ns)
    return path.stat().st_mtime_ns


def remove_stale_temps(run_dir: Path) -> None:
    """Remove the temp files of checkpoint writes that never finished (a killed job's) from ``run_dir``: only
    while holding the run folder (``dtrain fit``'s first process, under its lock), or a refused second fit would
    delete the running one's write in progress."""
    for d in (run_dir / "checkpoints", run_dir):
        for tmp in d.glob(f".*.ckpt{TMP_TAG}*"):
            log.warning("resume: removing %s, a checkpoint write that never finished", tmp)
            tmp.unlink(missing_ok=True)


# a method's own resume checks: (checkpoint path, its probed contents, recipe, run folder) -> None or CheckpointError
MethodCheck = Callable[[Path, Mapping[str, Any], Mapping[str, Any], Path], None]


def resume_path(run_dir: str | Path, resume: str | Path | None, *, recipe: Mapping[str, Any] | None = None,
                field: str = "--resume", teacher_target: bool = False, method_check: MethodCheck | None = None
                ) -> Path | None:
    """The checkpoint to resume from. ``None``: start fresh. ``"auto"``: the newest readable checkpoint of
    ``run_dir`` (fresh when there is none). ``"last"``: the same, but one must exist. Anything else: that file
    (or sharded directory), which must be readable. Truncated or unreadable files (and sharded directories with a
    shard missing or cut short) are logged and skipped. With ``recipe`` (the resolved recipe), the checkpoint must
    fit it (``check_resume``, then the method's ``method_check``: PD's round plan and round teacher). Errors name
    ``field``, the flag or recipe field that gave ``resume``."""
    if resume is None:
        return None
    run_dir = Path(run_dir)
    if str(resume) not in ("auto", "last"):
        path = Path(resume)
        if not path.exists():
            raise FileNotFoundError(f"{field}: checkpoint not found: {path}")
        ck = _probe(path, field)
    else:
        skipped: list[str] = []
        for path in checkpoint_candidates(run_dir):
            try:
                ck = _probe(path, "")
            except CheckpointError as e:
                log.warning("resume: skipping %s", e)
                skipped.append(str(e))
                continue
            if skipped:
                log.warning("resume: using %s (step %d) instead of %d unreadable newer checkpoint(s)", path,
                            ck["global_step"], len(skipped))
            break
        else:
            if resume == "auto" and not skipped:
                return None
            if skipped:
                raise CheckpointError(run_dir, field, f"no readable checkpoint; skipped: {'; '.join(skipped)}")
            raise FileNotFoundError(f"{field}: checkpoint not found: no checkpoints in {run_dir / 'checkpoints'}")
    if recipe is not None:
        check_resume(path, ck, recipe, field, teacher_target)
        if method_check is not None:
            method_check(path, ck, recipe, run_dir)
    return path
