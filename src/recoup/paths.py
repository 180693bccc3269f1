"""Where recoup keeps converted models and downloaded data (``RECOUP_HOME``)."""

from __future__ import annotations

import os
from pathlib import Path


def recoup_home() -> Path:
    """``$RECOUP_HOME`` or ``~/.cache/recoup``; created on first use."""
    home = Path(os.environ.get("RECOUP_HOME", Path.home() / ".cache" / "recoup")).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home
