"""Typed configs validated on construction (docs/design.md, house style 1).

Every method/stage config is a dataclass deriving from :class:`Config`. ``Config.from_dict``
rejects unknown keys with a message naming the key, suggesting the closest one and listing the
allowed ones; ``__post_init__`` of each subclass checks value ranges and raises RecoupError.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping, TypeVar

from recoup.errors import RecoupError

C = TypeVar("C", bound="Config")


@dataclasses.dataclass
class Config:
    """Base for typed configs."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any], where: str = "") -> C:
        allowed = cls.field_names()
        for key in data:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                prefix = f"{where}: " if where else ""
                raise RecoupError(f"{prefix}unknown key '{key}' for {cls.__name__}{hint} allowed: {', '.join(allowed)}")
        try:
            return cls(**dict(data))
        except TypeError as exc:  # wrong arity etc.
            raise RecoupError(f"{where or cls.__name__}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check(cond: bool, message: str) -> None:
    """Raise :class:`RecoupError` with ``message`` unless ``cond``."""
    if not cond:
        raise RecoupError(message)
