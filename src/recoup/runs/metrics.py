"""Evaluation results -> metric rows, and what a metric means (its direction, "matching", gap closed).

An evaluation result is ``{"results": {task: {metric: value, "n", "stderr", ...}}, "protocol": {...}}``.
Each numeric metric becomes one row ``(task, metric, value, n, stderr, protocol)``; counts, timings
and settings go to ``n`` and the protocol. "Matching" follows LLM-KICK: within 5% of the dense
model, in the metric's good direction. Gap closed = the share of the dense-vs-compressed gap
that the recovery won back.
"""

from __future__ import annotations

import math
from typing import Any

# Numeric fields of a task's result that are not metrics.
NOT_METRICS = {"n", "stderr", "seconds", "tokens", "windows", "windows_available", "limit", "seqlen", "seed",
               "batch_size", "shots", "k", "num_fewshot", "examples", "max_new_tokens", "context_tokens"}
BULKY = {"examples", "per_example", "records", "generations"}  # kept in the stage's result.json, not per row
LOWER_IS_BETTER = ("ppl", "nll", "loss", "perplexity", "bpb", "bits_per_byte")
# Preferred headline metric per task, in order.
PRIMARY_ORDER = ("ppl", "acc_norm", "acc", "exact_match", "em", "f1", "rougeL", "rouge_l", "rouge1", "score")


def lower_is_better(metric: str) -> bool:
    return metric.lower() in LOWER_IS_BETTER or metric.lower().endswith(("_ppl", "_nll", "_loss"))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def primary_metric(task: str, res: dict) -> str | None:
    """The headline metric of one task result: its declared ``primary``/``metric`` field, else by preference."""
    for field in ("primary", "primary_metric", "main_metric", "metric"):
        name = res.get(field)
        if isinstance(name, str) and _is_number(res.get(name)):
            return name
    numeric = [k for k, v in res.items() if _is_number(v) and k not in NOT_METRICS and not k.endswith("_stderr")]
    for name in PRIMARY_ORDER:
        if name in numeric:
            return name
    return numeric[0] if numeric else None


def metric_rows(evaluation: dict) -> list[dict]:
    """One row per (task, metric) of an evaluation result, with n, stderr and the protocol."""
    rows = []
    protocol_all = evaluation.get("protocol") or {}
    for task, res in (evaluation.get("results") or {}).items():
        n = res.get("n", res.get("windows"))
        stderr = res.get("stderr")
        primary = primary_metric(task, res)
        meta = {k: v for k, v in res.items() if (not _is_number(v) or k in NOT_METRICS) and k not in BULKY}
        meta.pop("stderr", None)
        nested = meta.pop("protocol", None)
        protocol = {**{k: v for k, v in protocol_all.items() if k != "seconds"}, **meta,
                    **(nested if isinstance(nested, dict) else {})}
        for metric, value in res.items():
            if not _is_number(value) or metric in NOT_METRICS or metric.endswith("_stderr"):
                continue
            if isinstance(stderr, dict):
                err = stderr.get(metric)
            elif _is_number(stderr) and metric == primary:
                err = stderr
            else:
                err = res.get(f"{metric}_stderr")
            rows.append({"task": task, "metric": metric, "value": float(value),
                         "n": int(n) if _is_number(n) else None,
                         "stderr": float(err) if _is_number(err) else None,
                         "protocol": {**protocol, "primary": metric == primary}})
    return rows


def matches(value: float, dense: float, metric: str, tolerance: float = 0.05) -> bool:
    """LLM-KICK's "matching": within ``tolerance`` (relative) of dense, or better."""
    if lower_is_better(metric):
        return value <= dense * (1 + tolerance)
    return value >= dense * (1 - tolerance)


def gap_closed(dense: float, compressed: float, recovered: float, metric: str | None = None,
               min_gap: float = 0.01) -> float | None:
    """(compressed - recovered) / (compressed - dense): 1 = all the loss won back, 0 = none, <0 = worse.

    None when there is no loss to win back: the compressed model is within ``min_gap`` (relative) of
    dense, or (given the ``metric``, hence its direction) better than dense.
    """
    gap = compressed - dense
    if abs(gap) <= min_gap * abs(dense) or abs(gap) < 1e-12:
        return None
    if metric is not None and (gap < 0 if lower_is_better(metric) else gap > 0):
        return None
    return (compressed - recovered) / gap
