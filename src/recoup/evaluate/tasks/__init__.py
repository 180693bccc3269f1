"""The task registry: task name -> runner ``(name, loaded, settings, recovery) -> metrics dict``.

Task families register explicitly below (docs/design.md, house style 2: by import, not by walking packages). A fixed
task is one ``TASKS.register(name, TaskSpec(...))`` line; a parametric family (``ppl:CORPUS``) registers
its prefix in :data:`FAMILIES` with a function ``name -> TaskSpec``.
Every result holds metric values with ``<metric>_stderr``, ``n`` and a ``protocol`` dict (source,
split, shots, template, limit, seed). Suites name groups of tasks: ``kick`` (LLM-KICK's five task
families) and ``zeroshot`` (the multiple-choice set of the compression papers).
"""

from __future__ import annotations

from typing import Callable

from recoup.errors import RecoupError
from recoup.evaluate.tasks import factoid, instruction, multiple_choice, perplexity, retrieval, summarization
from recoup.evaluate.tasks.common import OPTIONS, TaskRunner, TaskSpec, parse_options
from recoup.registry import Registry, unknown_name_message

TASKS: Registry[TaskSpec] = Registry("task")
FAMILIES: Registry[Callable[[str], TaskSpec]] = Registry("task family")  # "prefix:..." names
FAMILIES.register(perplexity.PREFIX, perplexity.spec)

for _name in multiple_choice.ZERO_SHOT_TASKS + ("mmlu",):
    TASKS.register(
        _name,
        TaskSpec(
            _name,
            "multiple_choice",
            multiple_choice.run,
            multiple_choice.PACK,
            multiple_choice.check,
            multiple_choice.load,
        ),
    )
for _name in factoid.TASKS:
    TASKS.register(
        _name, TaskSpec(_name, "factoid_qa", factoid.run, factoid.source(_name), factoid.checker(_name), factoid.load)
    )
for _name in retrieval.TASKS:
    TASKS.register(
        _name, TaskSpec(_name, "retrieval_qa", retrieval.run, retrieval.PACK, retrieval.check, retrieval.load)
    )
for _name in summarization.TASKS:
    TASKS.register(
        _name,
        TaskSpec(
            _name, "summarization", summarization.run, summarization.source(_name), summarization.checker(_name), None
        ),
    )
TASKS.register(
    "instructions",
    TaskSpec(
        "instructions",
        "instruction_following",
        instruction.run,
        "a jsonl file (--option instructions_file=PATH)",
        instruction.check,
        None,
    ),
)

SUITES: dict[str, list[str]] = {
    "kick": [
        "triviaqa",
        "nq_open",
        "qa_wikidata",
        "mmlu",
        "squad_closed",
        "squad_open",
        "coqa_closed",
        "coqa_open",
        "xsum",
        "cnndm",
        "instructions",
    ],
    "zeroshot": ["arc_easy", "arc_challenge", "piqa", "hellaswag", "boolq", "openbookqa", "winogrande", "sciq"],
}


def get_runner(name: str) -> TaskRunner:
    return get_spec(name).run


def get_spec(name: str) -> TaskSpec:
    """The spec of a task name: a registered task, or ``prefix:...`` of a registered family."""
    if ":" in name:
        return FAMILIES.get(name.split(":", 1)[0])(name)
    if name not in TASKS and any(name == f or name.startswith(f + "_") for f in FAMILIES.names()):
        raise RecoupError(f"task '{name}' needs a corpus: write {name.split('_')[0]}:CORPUS (e.g. ppl:ptb)")
    return TASKS.get(name)


def task_names() -> list[str]:
    """Every fixed task name and every family as ``prefix:...``."""
    return TASKS.names() + [f"{f}:..." for f in FAMILIES.names()]


def expand_suite(name: str) -> list[str]:
    try:
        return list(SUITES[name])
    except KeyError:
        raise RecoupError(unknown_name_message("suite", name, SUITES)) from None


def validate(tasks: list[str], options: dict) -> None:
    """Check every task name, its options and its data *before* a model is loaded."""
    for task in tasks:
        get_spec(task).check(options)


def load_examples(name: str, options: dict | None = None) -> list[dict]:
    """Every example (documents + gold) of a task that has a fixed dataset, in source order.

    Multiple-choice examples are ``{"id", "contexts", "continuations", "choices", "gold"}``; pass one to
    :func:`requests_for` to get its loglikelihood requests with the exact evaluation prompt.
    """
    spec = get_spec(name)
    if spec.load is None:
        raise RecoupError(f"task '{name}' reads a user file; it has no built-in examples")
    spec.check(options or {})
    return spec.load(name, options or {})


requests_for = multiple_choice.requests_for

__all__ = [
    "TASKS",
    "FAMILIES",
    "SUITES",
    "task_names",
    "OPTIONS",
    "TaskSpec",
    "get_runner",
    "get_spec",
    "expand_suite",
    "validate",
    "load_examples",
    "requests_for",
    "parse_options",
]
