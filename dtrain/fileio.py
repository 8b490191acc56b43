"""Files that are whole or absent: every file dtrain writes for a later run to read (checkpoints, shard indexes,
eval points, demo records, bundles, a run's recipe) goes through ``replacing``. The data is written to
``.<name>.tmp<host>.<pid>.<random>`` beside the target, flushed and fsynced, renamed over the target (``os.replace``,
atomic on POSIX), and the directory is fsynced. A process killed mid-write leaves the previous file intact plus a
stale temp file; processes writing the same file (every rank of every node writing the run's recipe; ranks in
containers share PIDs) each rename a whole file of their own."""

from __future__ import annotations

import json
import os
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from dtrain.errors import InputError

__all__ = ["TMP_TAG", "replacing", "write_text", "write_json", "exclusive", "BusyError"]

TMP_TAG = ".tmp"  # temp files are ``.<name>.tmp<host>.<pid>.<random>``


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def replacing(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temp file beside ``path`` (``mode``: "wb", or "w" for UTF-8 text); on a clean exit it is fsynced and
    renamed over ``path``, on an exception removed (``path`` is untouched). Creates missing parent directories."""
    if mode not in ("wb", "w"):
        raise ValueError(f"replacing: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_TAG}{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        with open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_text(path: str | Path, text: str) -> Path:
    """``text`` into ``path`` through ``replacing``."""
    with replacing(path, "w") as f:
        f.write(text)
    return Path(path)


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """``obj`` as JSON with one trailing newline, through ``replacing``."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


class BusyError(InputError):
    """Another process holds the lock of a folder this one would write (``exclusive``)."""


_HELD: set[int] = set()  # descriptors of locks this process holds (``exclusive``)


def _drop_held_in_child() -> None:
    """A forked child (a DataLoader worker) shares the lock's open file: dropping its copy keeps a killed parent's
    lock from living on in the workers, which outlast it by seconds. The descriptor is pointed at /dev/null rather
    than closed, so the child never reuses its number for a file of its own."""
    if not _HELD:
        return
    null = os.open(os.devnull, os.O_RDWR)
    for fd in _HELD:
        try:
            os.dup2(null, fd)
        except OSError:
            pass
    os.close(null)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_held_in_child)


def _me() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "job": os.environ.get("SLURM_JOB_ID"),
            "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)}


@contextmanager
def exclusive(path: str | Path, busy: str, error: type[Exception] = BusyError) -> Iterator[None]:
    """Hold an advisory lock (``flock``) on the file ``path`` while the block runs, the holder recorded in it;
    ``error(busy + " (held by pid 12 on node3, SLURM job 881)")`` when another process holds it. Unguarded where the
    platform or the filesystem has no locks. A holder from an earlier start of this same SLURM job (a lower
    ``SLURM_RESTART_COUNT``) counts as stale: a requeued job can start while a network filesystem still keeps its
    crashed node's lock. A file another user made (read-only to us) is locked without the record."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = _me()
    try:
        f = open(path, "a+", encoding="utf-8")
        writable = True
    except PermissionError:  # a teammate's lock file in a shared folder: flock needs no write access
        f, writable = open(path, encoding="utf-8"), False
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                holder = json.loads(f.read())
            except ValueError:
                holder = {}
            if not isinstance(holder, dict):
                holder = {}
            earlier = isinstance(holder.get("restart"), int) and holder["restart"] < me["restart"]
            if not (me["job"] and holder.get("job") == me["job"] and earlier):
                who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}" + (
                    f", SLURM job {holder['job']}" if holder.get("job") else "")
                raise error(f"{busy} (held by {who})") from None
            locked = False
        except OSError:  # a filesystem without locks (some NFS mounts)
            locked = False
        else:
            locked = True
            if writable:
                f.truncate(0)  # "a+" writes at the end, which is now the start
                f.write(json.dumps(me))
                f.flush()
        if locked:
            _HELD.add(f.fileno())
        try:
            yield
        finally:
            if locked:
                _HELD.discard(f.fileno())
                fcntl.flock(f, fcntl.LOCK_UN)
