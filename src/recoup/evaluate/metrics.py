"""Metrics: answer normalization, exact match, token F1, ROUGE-1/2/L, accuracy, stderr, "matching".

Normalization is SQuAD's (Rajpurkar et al. 2016): lower-case, drop punctuation and the articles
a/an/the, squeeze whitespace. ROUGE follows Lin (2004) with ``rouge_score``'s default tokenizer
(lower-case, non-alphanumerics become spaces, no stemming): ROUGE-N is n-gram overlap F-measure,
ROUGE-L the longest-common-subsequence F-measure. :func:`rouge_stemmed` is the variant summarization
papers report: the ``rouge-score`` package itself (Google's reimplementation of Lin's ROUGE-1.5.5) with
its Porter stemmer, including ROUGE-Lsum (summary-level LCS, sentences split at newlines); it needs
that package installed, there is no second implementation. "Matching" is LLM-KICK's definition (Jaiswal et
al. 2023, "Compressing LLMs: The Truth is Rarely Pure and Never Simple"): a compressed model matches
its dense parent on a task when its score is within 5% of the dense score.
"""

from __future__ import annotations

import functools
import math
import re
import string
from collections import Counter
from typing import Any, Iterable, Sequence

from recoup.errors import RecoupError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_ROUGE_TOKEN = re.compile(r"[^a-z0-9]+")


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lower, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, golds: Iterable[str]) -> float:
    """1.0 when the normalized prediction equals a normalized gold answer (SQuAD EM)."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def contains_answer(generated: str, golds: Iterable[str]) -> float:
    """LLM-KICK's factoid EM: 1.0 when a normalized gold alias appears (on word boundaries) in the
    normalized *generated* text. Pass only the generated continuation, never the prompt."""
    text = f" {normalize_answer(generated)} "
    return float(any((g := normalize_answer(a)) and f" {g} " in text for a in golds))


def token_f1(prediction: str, golds: Iterable[str]) -> float:
    """Best bag-of-tokens F1 between the normalized prediction and any gold answer (SQuAD F1)."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for gold in golds:
        ref = normalize_answer(gold).split()
        if not pred or not ref:
            best = max(best, float(pred == ref))
            continue
        common = sum((Counter(pred) & Counter(ref)).values())
        if common:
            p, r = common / len(pred), common / len(ref)
            best = max(best, 2 * p * r / (p + r))
    return best


def rouge_tokens(text: str) -> list[str]:
    return [t for t in _ROUGE_TOKEN.split(text.lower()) if t]


def _f(overlap: int, n_pred: int, n_ref: int) -> float:
    if overlap == 0 or n_pred == 0 or n_ref == 0:
        return 0.0
    p, r = overlap / n_pred, overlap / n_ref
    return 2 * p * r / (p + r)


def rouge_n(prediction: str, reference: str, n: int) -> float:
    """ROUGE-N F-measure."""

    def grams(tokens: list[str]) -> Counter:
        return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))

    p, r = grams(rouge_tokens(prediction)), grams(rouge_tokens(reference))
    return _f(sum((p & r).values()), sum(p.values()), sum(r.values()))


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L (sentence-level LCS) F-measure."""
    p, r = rouge_tokens(prediction), rouge_tokens(reference)
    return _f(_lcs(p, r), len(p), len(r))


def rouge(prediction: str, reference: str) -> dict[str, float]:
    return {
        "rouge1": rouge_n(prediction, reference, 1),
        "rouge2": rouge_n(prediction, reference, 2),
        "rougeL": rouge_l(prediction, reference),
    }


STEMMED_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@functools.lru_cache(maxsize=1)
def _stemmed_scorer() -> Any:
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise RecoupError(
            "stemmed ROUGE uses the rouge-score package, which is not installed; "
            "pip install rouge-score (or recoup[test])"
        ) from None
    return rouge_scorer.RougeScorer(list(STEMMED_KEYS), use_stemmer=True)


def require_rouge_score() -> None:
    """Raise one clear line when the ``rouge-score`` package is missing (call before loading a model)."""
    _stemmed_scorer()


def rouge_stemmed(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L/Lsum F-measures from ``rouge-score`` with ``use_stemmer=True`` (Lin 2004; Porter stemming).

    ROUGE-Lsum takes newlines as sentence boundaries (``rouge-score``'s convention): give multi-sentence
    references and predictions one sentence per line.
    """
    scores = _stemmed_scorer().score(reference, prediction)
    return {key: scores[key].fmeasure for key in STEMMED_KEYS}


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def stderr(values: Sequence[float]) -> float:
    """Standard error of the mean with the sample standard deviation (lm-eval's ``mean_stderr``)."""
    n = len(values)
    if n < 2:
        return float("nan")
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def argmax(values: Sequence[float]) -> int:
    """Index of the first maximum (numpy's tie rule, as lm-eval uses)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


LOWER_IS_BETTER = ("ppl", "nll", "loss", "perplexity", "bpb", "bits_per_byte")


def lower_is_better(metric: str) -> bool:
    """A metric's direction by its name: perplexity, NLL and losses are lower-is-better."""
    return metric.lower() in LOWER_IS_BETTER or metric.lower().endswith(("_ppl", "_nll", "_loss"))


def matching(
    dense: float, other: float, tolerance: float = 0.05, higher_is_better: bool | None = None, metric: str | None = None
) -> bool:
    """LLM-KICK's "matching" (the one definition recoup uses): ``other`` is within ``tolerance`` (relative)
    of ``dense``, or better. The direction is ``higher_is_better`` or, given ``metric``, its name's.

    For higher-is-better metrics a score above dense also matches; for lower-is-better (perplexity)
    a score below dense matches.
    """
    if higher_is_better is None:
        higher_is_better = not lower_is_better(metric or "")
    if dense == 0:
        return other == 0 or (other > 0) == higher_is_better
    rel = (other - dense) / abs(dense)
    return rel >= -tolerance if higher_is_better else rel <= tolerance


def summarize(values: dict[str, list[float]]) -> dict[str, float]:
    """``{metric: mean, metric_stderr: stderr}`` for per-example metric lists."""
    out: dict[str, float] = {}
    for name, vals in values.items():
        out[name] = mean(vals)
        out[f"{name}_stderr"] = stderr(vals)
    return out
