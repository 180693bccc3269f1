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

from recoup.evaluate.metrics import lower_is_better, matching

# Numeric fields of a task's result that are not metrics.
NOT_METRICS = {
    "n",
    "stderr",
    "seconds",
    "tokens",
    "windows",
    "windows_available",
    "limit",
    "seqlen",
    "seed",
    "batch_size",
    "shots",
    "k",
    "num_fewshot",
    "examples",
    "max_new_tokens",
    "context_tokens",
}
BULKY = {"examples", "per_example", "records", "generations"}  # kept in the stage's result.json, not per row
# Preferred headline metric per task, in order.
PRIMARY_ORDER = ("ppl", "acc_norm", "acc", "exact_match", "em", "f1", "rougeL", "rouge_l", "rouge1", "score")


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
        protocol = {
            **{k: v for k, v in protocol_all.items() if k != "seconds"},
            **meta,
            **(nested if isinstance(nested, dict) else {}),
        }
        for metric, value in res.items():
            if not _is_number(value) or metric in NOT_METRICS or metric.endswith("_stderr"):
                continue
            if isinstance(stderr, dict):
                err = stderr.get(metric)
            elif _is_number(stderr) and metric == primary:
                err = stderr
            else:
                err = res.get(f"{metric}_stderr")
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "value": float(value),
                    "n": int(n) if _is_number(n) else None,
                    "stderr": float(err) if _is_number(err) else None,
                    "protocol": {**protocol, "primary": metric == primary},
                }
            )
    return rows


def gap_closed(
    dense: float, compressed: float, recovered: float, metric: str | None = None, min_gap: float = 0.01
) -> float | None:
    """(compressed - recovered) / (compressed - dense): 1 = all the loss won back, 0 = none, <0 = worse.

    None when there is no loss to win back: the compressed model is within ``min_gap`` (relative) of
    dense, or (given the ``metric``, hence its direction) better than dense.
    """
    gap = compressed - dense
    if abs(gap) <= min_gap * abs(dense) or abs(gap) < 1e-12:
        return None
    if metric is not None and (gap < 0 if lower_is_better(metric) else gap > 0):
        return None
    return (compressed - recovered) / gap + 0.0  # + 0.0: no recovery reads 0%, not -0%


# ----------------------------------------------------------------------------- two results files

COMPARE_SKIP = {
    "n",
    "seconds",
    "tokens",
    "windows",
    "seqlen",
    "windows_available",
    "limit",
    "n_judged",
    "distinct_tokens_all",
    "unique_tokens",
}


def headline(result: dict, all_metrics: bool = False) -> list[str]:
    """The metrics of one task result worth comparing (every numeric one with ``all_metrics``)."""
    numeric = [
        k
        for k, v in result.items()
        if isinstance(v, (int, float))
        and not isinstance(v, bool)
        and not k.endswith("_stderr")
        and k not in COMPARE_SKIP
        and not k.startswith("n_")
    ]
    if all_metrics:
        return numeric
    judge = [k for k in numeric if k.startswith("judge_") and not k.endswith("_reference")]
    for group in (("acc", "acc_norm"), ("em", "f1"), ("rouge1", "rouge2", "rougeL"), ("ppl",)):
        chosen = [k for k in group if k in numeric]
        if chosen:
            return chosen + judge
    return judge or numeric


def compare_results(dense: dict, other: dict, tolerance: float = 0.05, all_metrics: bool = False) -> dict:
    """Rows ``{task, metric, dense, other, delta, relative, matching}`` plus tasks present in one file only."""
    rows = []
    d_res, o_res = dense["results"], other["results"]
    for task in d_res:
        if task not in o_res:
            continue
        for metric in headline(d_res[task], all_metrics):
            a, b = d_res[task].get(metric), o_res[task].get(metric)
            if not _is_number(a) or not _is_number(b):
                continue
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "dense": a,
                    "other": b,
                    "delta": b - a,
                    "relative": (b - a) / abs(a) if a else None,
                    "n_dense": d_res[task].get("n"),
                    "n_other": o_res[task].get("n"),
                    "matching": matching(a, b, tolerance, metric=metric),
                }
            )
    return {
        "dense": dense.get("model"),
        "other": other.get("model"),
        "tolerance": tolerance,
        "rows": rows,
        "only_dense": sorted(set(d_res) - set(o_res)),
        "only_other": sorted(set(o_res) - set(d_res)),
    }
