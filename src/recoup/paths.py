"""Where recoup keeps converted models and downloaded data (``RECOUP_HOME``)."""

from __future__ import annotations

import os
from pathlib import Path


def recoup_home() -> Path:
    """``$RECOUP_HOME`` or ``~/.cache/recoup``; created on first use."""
    home = Path(os.environ.get("RECOUP_HOME", Path.home() / ".cache" / "recoup")).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def member(folder: Path, name: object, where: str) -> Path:
    """``folder / name`` for a file name read from a manifest or record, accepted only as a plain file name in
    that folder: no separator, no ``..``, not absolute. A manifest's digest can be recomputed by anyone, so the
    names it lists are checked, never trusted, before any file is read."""
    from recoup.errors import RecoupError

    ok = (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and Path(name).name == name
        and not Path(name).is_absolute()
    )
    if not ok:
        raise RecoupError(
            f"{where} names the file {name!r}, which is not a plain file name inside {folder}; "
            f"refused (a crafted or corrupted manifest?)"
        )
    return folder / name
