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

__all__ = ["TMP_TAG", "replacing", "write_text", "write_json"]

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
