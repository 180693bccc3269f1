"""Run a list of evaluation tasks on one model (optionally with a recovery) and collect results.

Task names are looked up in the task registry (:mod:`recoup.evaluate.tasks`), perplexity (``ppl:CORPUS``)
included.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from typing import Any

import torch

from recoup.errors import RecoupError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalSettings:
    seqlen: int = 2048
    limit: int | None = None
    batch_size: int = 8
    seed: int = 0
    bos: str = "auto"  # the BOS policy (recoup.data.bos): auto | always | never
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # task-family options (judge, shots...)


def split_task_list(spec: str) -> list[str]:
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    if not tasks:
        raise RecoupError("--tasks is empty; name at least one task, e.g. ppl:ptb")
    return tasks


def resolve(
    tasks: str | list[str] | None, suite: str | None, options: dict | None = None
) -> tuple[list[str], dict[str, str]]:
    """Task names from ``--tasks`` and/or ``--suite`` (deduplicated, in order) and the suite tasks skipped.

    Every task named in ``--tasks`` is validated with its options and data (RecoupError before any model
    loads). A suite's task whose data is missing (:class:`~recoup.errors.MissingData`: an optional source not
    installed, a task file not given) is skipped instead and returned as ``{task: one-line reason}``; any other
    problem with it is still an error."""
    from recoup.errors import MissingData
    from recoup.evaluate import tasks as registry

    names = split_task_list(tasks) if isinstance(tasks, str) else list(tasks or [])
    names = list(dict.fromkeys(names))
    registry.validate(names, options or {})  # every name known, its options and data present
    skipped: dict[str, str] = {}
    if suite:
        for name in registry.expand_suite(suite):
            if name in names:
                continue
            try:
                registry.validate([name], options or {})
            except MissingData as exc:
                skipped[name] = " ".join(str(exc).split())
                continue
            names.append(name)
    if not names:
        if skipped:
            raise RecoupError(f"no task of suite '{suite}' has its data; first: {next(iter(skipped.values()))}")
        raise RecoupError("name tasks with --tasks (e.g. ppl:ptb,arc_easy) or a suite with --suite (kick, zeroshot)")
    return names, skipped


def resolve_tasks(tasks: str | list[str] | None, suite: str | None, options: dict | None = None) -> list[str]:
    """The task names of :func:`resolve` (a suite's tasks without their data left out)."""
    return resolve(tasks, suite, options)[0]


TUNED_ON_TASK_WARNING = (
    "the recovery was tuned on the train part of this task, and these scores include its training "
    "examples; `recoup compare-recovery --task T` scores the held-out part only"
)


def _tuned_task(recovery) -> str | None:
    """The task a recovery was tuned on (its recorded tuning protocol), if any."""
    if recovery is None:
        return None
    data = recovery.describe().get("data")
    return data.get("task") if isinstance(data, dict) else None


def attach(loaded, recovery):
    """``loaded`` with ``recovery``'s adapters attached (``Recovery.apply``), the model every task then runs.

    Attach once per loaded model: ``apply`` wraps the model in place (PEFT injects its layers into the base),
    so a second call would stack a second adapter on the first. A prefix-only recovery leaves the model as is.
    """
    if recovery is None:
        return loaded
    return dataclasses.replace(loaded, model=recovery.apply(loaded.model))


def evaluate(loaded, tasks: list[str], settings: EvalSettings, recovery=None, attached: bool = False) -> dict:
    """Evaluate every task; returns ``{"model", "results": {task: {...}}, "protocol": {...}}``.

    ``attached``: ``loaded`` already runs with ``recovery`` attached (:func:`attach`, e.g. once for several
    calls); otherwise it is attached here. Each task runner gets the attached model and the recovery (for its
    per-batch prefix) and never attaches it again."""
    from recoup.data.bos import bos_id
    from recoup.evaluate import tasks as registry

    runners = [(task, registry.get_runner(task)) for task in tasks]  # every name known before the first runs
    registry.validate(tasks, settings.options)  # options, files and installed data, before any scoring
    tuned_task = _tuned_task(recovery)
    run_loaded = loaded if attached else attach(loaded, recovery)
    results: dict[str, dict] = {}
    started = time.time()
    if tuned_task in tasks:
        log.warning("%s: %s", tuned_task, TUNED_ON_TASK_WARNING)
    for name, runner in runners:
        t0 = time.time()
        results[name] = runner(name, run_loaded, settings, recovery)
        results[name]["seconds"] = round(time.time() - t0, 3)
        if name == tuned_task:
            results[name]["warning"] = TUNED_ON_TASK_WARNING
    protocol = {
        "seqlen": settings.seqlen,
        "limit": settings.limit,
        "seed": settings.seed,
        "bos": settings.bos,
        "bos_token_id": bos_id(loaded.tokenizer, settings.bos),
        "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "recovery": recovery.describe() if recovery is not None else None,
        "options": {k: v for k, v in settings.options.items() if isinstance(v, (str, int, float, bool))},
        "seconds": round(time.time() - started, 3),
    }
    return {"model": loaded.source, "results": results, "protocol": protocol}
