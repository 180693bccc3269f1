"""Per-example multiple-choice scores of a list of examples (e.g. a task's held-out part) through the Scorer.

The examples are the task suite's dicts (``contexts``, ``continuations``, ``choices``, ``gold``); each choice is
one loglikelihood request, and acc / acc_norm follow lm-evaluation-harness's definitions
(:func:`recoup.evaluate.tasks.multiple_choice.score_example`). The model already has the recovery's adapters
attached (``recovery.apply``); the recovery is asked for its prefix per batch.
"""

from __future__ import annotations

from torch import nn


def per_example_scores(
    model: nn.Module,
    tokenizer,
    suite: list[dict],
    recovery=None,
    batch_size: int = 8,
    max_length: int = 2048,
    desc: str = "score",
) -> dict[str, list[float]]:
    """``{"acc": [...], "acc_norm": [...]}``, one value per example of ``suite``, in order."""
    from recoup.evaluate.scorer import Scorer
    from recoup.evaluate.tasks.multiple_choice import requests_for, score_example

    scorer = Scorer(model, tokenizer, recovery, batch_size=batch_size, max_length=max_length, attached=True)
    scores = scorer.loglikelihood([r for ex in suite for r in requests_for(ex)], desc=desc)
    per: dict[str, list[float]] = {"acc": [], "acc_norm": []}
    pos = 0
    for ex in suite:
        k = len(ex["choices"])
        for key, value in score_example(ex, [s for s, _ in scores[pos : pos + k]]).items():
            per[key].append(value)
        pos += k
    return per


def score_examples(
    model: nn.Module,
    tokenizer,
    suite: list[dict],
    recovery=None,
    batch_size: int = 8,
    max_length: int = 2048,
    desc: str = "held-out",
) -> dict:
    """acc / acc_norm with their standard errors (:func:`recoup.evaluate.metrics.summarize`) and ``n``."""
    from recoup.evaluate.metrics import summarize

    per = per_example_scores(model, tokenizer, suite, recovery, batch_size, max_length, desc=desc)
    return {**summarize(per), "n": len(suite)}
