"""Name -> object registries whose misses suggest the closest names (docs/design.md, house style 2)."""

from __future__ import annotations

import difflib
from typing import Generic, Iterable, TypeVar

from recoup.errors import RecoupError

T = TypeVar("T")


def unknown_name_message(kind: str, name: str, known: Iterable[str]) -> str:
    """``unknown method 'sparsgpt'; did you mean 'sparsegpt'? known: a, b, c``."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown {kind} '{name}'{hint} known: {', '.join(known)}"


class Registry(Generic[T]):
    """A small explicit registry: ``register(name, obj)`` and ``get(name)`` with suggestions."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} '{name}' registered twice")
        self._items[name] = obj
        return obj

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise RecoupError(unknown_name_message(self.kind, name, self._items)) from None

    def unregister(self, name: str) -> T:
        """Remove an entry (for code that registers something for a while, e.g. a test)."""
        return self._items.pop(name)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
