"""Instruction following (LLM-KICK task 5; Jaiswal et al. 2023).

Questions come from a jsonl file (``{question_id, text, category}``, LLM-KICK's 80 questions have
this layout). Answers are generated greedily through the model's chat template. Reported: the mean
count of unique tokens per answer and the distinct tokens over all answers (LLM-KICK's sign of
degenerate, repetitive answers), and, with a judge configured, the judge's 1-10 score: pairwise
against reference answers (``instructions_reference``: a recoup results JSON of e.g. the dense model,
or a jsonl of ``{question_id, text}``), or single-answer grading without one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from recoup.errors import RecoupError
from recoup.evaluate.metrics import summarize
from recoup.evaluate.tasks.common import (
    bool_option,
    file_option,
    int_option,
    make_scorer,
    protocol,
    read_jsonl,
    sample_indices,
)
from recoup.evaluate.tasks.judging import judge_all

log = logging.getLogger(__name__)


def check(options: dict) -> None:
    file_option(options, "instructions_file", "instructions")
    if options.get("instructions_reference"):
        file_option(options, "instructions_reference", "instructions")


def load_references(path: Path) -> dict[str, str]:
    """question_id -> reference answer, from a recoup results JSON or a jsonl of {question_id, text}."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        try:
            return {str(r["id"]): r["generated"] for r in data["results"]["instructions"]["examples"]}
        except (KeyError, TypeError):
            raise RecoupError(f"{path} is JSON but not recoup results holding an 'instructions' task") from None
    return {str(r["question_id"]): r["text"] for r in read_jsonl(path, ("question_id", "text"))}


def run(name: str, loaded, settings, recovery) -> dict:
    path = file_option(settings.options, "instructions_file", name)
    rows = read_jsonl(path, ("question_id", "text"))
    chosen = [rows[i] for i in sample_indices(len(rows), settings.limit, settings.seed)]
    max_new = int_option(settings.options, "max_new_tokens", 256)
    chat = bool_option(settings.options, "chat", True)
    judge = settings.options.get("judge")
    ref_path = settings.options.get("instructions_reference")
    refs = load_references(Path(ref_path).expanduser()) if (judge is not None and ref_path) else {}
    missing = [
        str(r["question_id"]) for r in chosen if ref_path and judge is not None and str(r["question_id"]) not in refs
    ]
    if missing:
        raise RecoupError(f"the reference answers in {ref_path} lack question_id(s) {', '.join(missing[:5])}")
    scorer = make_scorer(loaded, settings, recovery)
    prompts = [scorer.chat_prompt(r["text"]) if chat else r["text"] + "\n" for r in chosen]
    answers = [a.strip() for a in scorer.generate(prompts, max_new_tokens=max_new, desc=name)]
    token_sets = [set(scorer.encode(a)) for a in answers]
    records = [
        {"id": str(r["question_id"]), "category": r.get("category"), "generated": a, "unique_tokens": len(t)}
        for r, a, t in zip(chosen, answers, token_sets)
    ]
    result = {
        **summarize({"unique_tokens": [float(len(t)) for t in token_sets]}),
        "n": len(chosen),
        "distinct_tokens_all": len(set().union(*token_sets)) if token_sets else 0,
    }
    if judge is not None:
        items = [(r["text"], a, refs.get(str(r["question_id"]))) for r, a in zip(chosen, answers)]
        result.update(judge_all(judge, "instruction", items, records))
    result["protocol"] = protocol(
        f"file {path}",
        "file",
        "{text} as one user turn" if chat else "{text}\\n",
        settings,
        len(rows),
        shots=0,
        chat_template=chat,
        max_new_tokens=max_new,
        decoding="greedy",
        judge=judge.describe() if judge is not None else None,
        judge_mode=("pairwise vs " + str(ref_path)) if (judge and ref_path) else ("single answer" if judge else None),
    )
    result["examples"] = records
    log.info("instructions: n=%d unique tokens/answer=%.1f", len(chosen), result["unique_tokens"])
    return result
