"""The one exception type a user sees as a single line (the CLI prints it and exits 2)."""

from __future__ import annotations


class RecoupError(Exception):
    """Bad input or a missing resource: the message says what was wrong and what to do."""
