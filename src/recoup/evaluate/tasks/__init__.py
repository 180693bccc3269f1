"""The task registry: task name -> runner ``(name, loaded, settings, recovery) -> metrics dict``.

Task families register explicitly below (house style 2: by import, not by walking packages).
"""

from __future__ import annotations

from typing import Callable

from recoup.registry import Registry

TaskRunner = Callable[..., dict]
TASKS: Registry[TaskRunner] = Registry("task")
SUITES: dict[str, list[str]] = {}


def get_runner(name: str) -> TaskRunner:
    return TASKS.get(name)
