"""Name -> object tables. An unknown name fails with the field it came from and the valid choices."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from dtrain.errors import UnknownNameError

T = TypeVar("T")

__all__ = ["Registry"]


class Registry(Generic[T]):
    """A small typed dict of named components (schedules, samplers, methods, models, extractors)."""

    def __init__(self, kind: str) -> None:
        self.kind, self._items = kind, {}  # type: ignore[var-annotated]
        self._items: dict[str, T]

    def register(self, name: str, obj: T | None = None):
        def add(o: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self._items[name] = o
            return o

        return add(obj) if obj is not None else add

    def get(self, name: str, field: str | None = None) -> T:
        if name not in self._items:
            where = f"{field}: " if field else ""
            raise UnknownNameError(f"{where}unknown {self.kind} {name!r}; choose one of {sorted(self._items)}")
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)
