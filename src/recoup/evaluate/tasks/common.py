"""Shared pieces of task families: the task spec, seeded subsets, options, the Scorer for a task."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any, Callable

from recoup.errors import MissingData, RecoupError
from recoup.registry import unknown_name_message

TaskRunner = Callable[..., dict]

# --option KEY=VALUE: every key a task family reads, with its help line (validated before a model loads)
OPTIONS: dict[str, str] = {
    "shots": "MMLU in-context examples from the dev split (default 5)",
    "context_tokens": "open-book retrieval QA: the passage is cut to this many tokens (default 512)",
    "max_new_tokens": "generation length for generative tasks (default per task: 32 QA, 64 XSum, 200 CNN/DM, "
    "256 instructions)",
    "cnndm_file": "jsonl of CNN/DM stories ({question_id, text, category}; LLM-KICK's file) for task cnndm",
    "instructions_file": "jsonl of questions ({question_id, text, category}) for task instructions",
    "instructions_reference": "reference answers for the judge: a recoup results JSON (e.g. the dense run) or a "
    "jsonl of {question_id, text}",
    "chat": "wrap summarization/instruction prompts in the tokenizer's chat template: true|false (default true)",
    "rouge": "summarization ROUGE: plain (recoup's ROUGE-1/2/L, no stemming; the default) or stemmed (the rouge-score "
    "package's Porter-stemmed ROUGE-1/2/L/Lsum, the variant summarization papers report)",
    "factoid_template": "factoid QA prompt: kick (LLM-KICK's, the default), cloze (the question text alone, the "
    "natural form of qa_wikidata's statements) or a format string with {question} (\\n = newline)",
}


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One registered task: its family, its runner, the source it reads and a pre-flight check."""

    name: str
    family: str
    run: TaskRunner
    source: str
    check: Callable[[dict], None] = lambda options: None  # raises RecoupError when data/options are missing
    load: Callable[..., list[dict]] | None = None  # examples (documents + gold), for reuse in training
    lower_is_better: bool = False  # its headline metric's direction (perplexity: lower)


def parse_options(items: list[str] | None) -> dict[str, Any]:
    """``["shots=5", "cnndm_file=x.jsonl"]`` -> dict; unknown keys get "did you mean"; every value is
    checked against its key's type and range (:data:`OPTION_RANGES`, files exist and are UTF-8 text)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecoupError(f"--option wants KEY=VALUE (got '{item}')")
        if key not in OPTIONS:
            raise RecoupError(unknown_name_message("task option", key, OPTIONS))
        check_option(key, value)
        out[key] = value
    return out


# integer options: (minimum, maximum)
OPTION_RANGES: dict[str, tuple[int, int]] = {
    "shots": (0, 64),
    "context_tokens": (1, 1 << 17),
    "max_new_tokens": (1, 1 << 15),
}
FILE_OPTIONS = ("cnndm_file", "instructions_file", "instructions_reference")


def check_option(key: str, value: Any) -> None:
    """One line when ``value`` is not valid for option ``key`` (before any model loads)."""
    if key in OPTION_RANGES:
        int_option({key: value}, key, 0, *OPTION_RANGES[key])
    elif key == "chat":
        bool_option({key: value}, key, True)
    elif key in FILE_OPTIONS:
        from recoup.data.corpora import check_text_file

        check_text_file(str(value), f"option {key}")


def int_option(options: dict, key: str, default: int, minimum: int = 1, maximum: int | None = None) -> int:
    raw = options.get(key, default)
    if isinstance(raw, bool) or isinstance(raw, float) and not raw.is_integer():
        raise RecoupError(f"option {key} must be an integer (got '{raw}')")
    try:
        value = int(str(raw).strip()) if not isinstance(raw, (int, float)) else int(raw)
    except (TypeError, ValueError):
        raise RecoupError(f"option {key} must be an integer (got '{raw}')") from None
    if value < minimum:
        raise RecoupError(f"option {key} must be at least {minimum} (got {value})")
    if maximum is not None and value > maximum:
        raise RecoupError(f"option {key} must be at most {maximum} (got {value})")
    return value


def bool_option(options: dict, key: str, default: bool) -> bool:
    raw = options.get(key, default)
    if isinstance(raw, bool):
        return raw
    if str(raw).lower() in ("1", "true", "yes", "on"):
        return True
    if str(raw).lower() in ("0", "false", "no", "off"):
        return False
    raise RecoupError(f"option {key} must be true or false (got '{raw}')")


def file_option(options: dict, key: str, task: str) -> Path:
    raw = options.get(key)
    if not raw:
        raise MissingData(f"task '{task}' reads a jsonl file: pass --option {key}=PATH ({OPTIONS[key]})")
    path = Path(str(raw)).expanduser()
    if not path.is_file():
        raise RecoupError(f"option {key}: no such file '{raw}'")
    from recoup.data.corpora import check_text_file

    check_text_file(path, f"option {key}")
    return path


def read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise RecoupError(f"{path}:{i}: not a JSON object") from None
            missing = [k for k in required if not isinstance(row, dict) or k not in row]
            if missing:
                raise RecoupError(f"{path}:{i}: missing field(s) {', '.join(missing)} (need {', '.join(required)})")
            rows.append(row)
    if not rows:
        raise RecoupError(f"{path} holds no examples")
    return rows


def sample_indices(total: int, limit: int | None, seed: int) -> list[int]:
    """All indices, or a seeded sample of ``limit`` of them (sorted, so order follows the source)."""
    if limit is None or limit >= total:
        return list(range(total))
    return sorted(random.Random(seed).sample(range(total), limit))


def make_scorer(loaded, settings, recovery):
    """The Scorer for a task run; the runner has already attached the recovery to ``loaded.model``."""
    from recoup.evaluate.scorer import Scorer

    return Scorer(
        loaded.model,
        loaded.tokenizer,
        recovery,
        batch_size=settings.batch_size,
        max_length=settings.seqlen,
        attached=True,
        bos=settings.bos,
    )


def protocol(source: str, split: str, template: str, settings, n_available: int, **extra: Any) -> dict:
    """What was measured, how: enough to reproduce the number."""
    return {
        "source": source,
        "split": split,
        "template": template,
        "limit": settings.limit,
        "seed": settings.seed,
        "n_available": n_available,
        **extra,
    }
