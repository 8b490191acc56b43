"""The error of bad user input: a recipe field, a command-line flag, a file. ``dtrain``'s commands print it as one
line naming what is wrong (exit code 2), never a traceback; the library's own checks raise it (or a subclass:
``RecipeError``, ``CheckpointError``, ``BundleError``, ``RefStatsError``)."""

from __future__ import annotations

__all__ = ["InputError", "UnknownNameError"]


class InputError(ValueError):
    """Bad input from the user; the message names the field, flag or file and what would be valid."""


class UnknownNameError(InputError, KeyError):
    """A name that is not in a table (a sampler, schedule, extractor ...); also a ``KeyError`` for lookups."""

    def __str__(self) -> str:  # KeyError quotes its message; this one is read by people
        return str(self.args[0]) if self.args else ""
