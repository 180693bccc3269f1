"""The one exception type a user sees as a single line (the CLI prints it and exits 2)."""

from __future__ import annotations


class RecoupError(Exception):
    """Bad input or a missing resource: the message says what was wrong and what to do."""


class MissingData(RecoupError):
    """A data source or file a task needs is not present; the message names it and how to provide it.

    A suite (``--suite kick``) skips the tasks that raise it and names them; a task asked for by name refuses."""
