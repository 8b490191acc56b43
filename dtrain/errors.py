"""The error of bad user input: a recipe field, a command-line flag, a file. ``dtrain``'s commands print it as one
line naming what is wrong (exit code 2), never a traceback; the library's own checks raise it (or a subclass:
``RecipeError``, ``CheckpointError``, ``BundleError``, ``RefStatsError``). Also the checks shared by the commands."""

from __future__ import annotations

import math
import numbers
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["InputError", "UnknownNameError", "MissingFileError", "check_writable", "check_count", "first_line"]


class InputError(ValueError):
    """Bad input from the user; the message names the field, flag or file and what would be valid."""


class UnknownNameError(InputError, KeyError):
    """A name that is not in a table (a sampler, schedule, extractor ...); also a ``KeyError`` for lookups."""

    def __str__(self) -> str:  # KeyError quotes its message; this one is read by people
        return str(self.args[0]) if self.args else ""


class MissingFileError(InputError, FileNotFoundError):
    """A file the input names is not there; also a ``FileNotFoundError`` for callers that catch that."""


def check_count(value: Any, key: str, what: str = "") -> int:
    """``value`` as a count >= 1 (a Python or numpy int, or an integral float), else ``InputError`` naming ``key``
    (``what``: what it counts, for the message)."""
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
          and float(value).is_integer() and value >= 1)
    if not ok:
        raise InputError(f"{key}: must be an int >= 1{f' ({what})' if what else ''}, got {value!r}")
    return int(value)


def check_writable(path: str | Path, key: str, *, directory: bool = False) -> Path:
    """Fail before any work when ``path`` (a file, or with ``directory`` a folder) cannot be written there:
    ``InputError`` naming ``key`` (a flag: ``--out``). Missing parent folders are fine (they are created)."""
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise InputError(f"{key}: {path} is a file, not a directory")
    if not directory and path.is_dir():
        raise InputError(f"{key}: {path} is a directory; give a file name")
    top = (path if directory else path.parent).absolute()
    base = next(p for p in (top, *top.parents) if p.exists())
    if not base.is_dir():
        raise InputError(f"{key}: cannot create {path}: {base} is not a directory")
    try:
        tempfile.TemporaryFile(dir=base).close()
    except OSError as e:
        raise InputError(f"{key}: cannot create {path}: cannot write in {base} ({e.strerror})") from None
    return path


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when empty), for a one-line error."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return line if len(line) <= limit else line[:limit] + " ..."
