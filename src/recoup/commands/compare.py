"""recoup compare DENSE.json OTHER.json: per-task deltas and LLM-KICK "matching" (within 5% of dense)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from recoup.errors import RecoupError

_SKIP = {"n", "seconds", "tokens", "windows", "seqlen", "windows_available", "limit", "n_judged",
         "distinct_tokens_all", "unique_tokens"}
_LOWER_IS_BETTER = {"ppl", "nll"}


def register(sub) -> None:
    p = sub.add_parser("compare", help="per-task deltas of a run against the dense run, and which tasks match",
                       description="Compare two `recoup eval --json` results. A task metric 'matches' when it is "
                                   "within the tolerance (5%%, LLM-KICK's definition) of the dense value.")
    p.add_argument("dense", help="results JSON of the dense (reference) model")
    p.add_argument("other", help="results JSON of the compressed / recovered model")
    p.add_argument("--tolerance", type=float, default=0.05, help="relative tolerance for matching (default 0.05)")
    p.add_argument("--all-metrics", action="store_true", help="compare every metric, not only each task's headline ones")
    p.add_argument("--json", default=None, help="write the comparison JSON here")
    p.set_defaults(func=run)


def _load(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecoupError(f"no such results file: '{path}'") from None
    except json.JSONDecodeError as exc:
        raise RecoupError(f"'{path}' is not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise RecoupError(f"'{path}' is not a recoup results file (write one with `recoup eval ... --json PATH`)")
    return data


def headline(result: dict, all_metrics: bool = False) -> list[str]:
    """The metrics of one task result worth comparing (every numeric one with ``all_metrics``)."""
    numeric = [k for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               and not k.endswith("_stderr") and k not in _SKIP and not k.startswith("n_")]
    if all_metrics:
        return numeric
    for group in (("acc", "acc_norm"), ("em", "f1"), ("rouge1", "rouge2", "rougeL"), ("ppl",)):
        chosen = [k for k in group if k in numeric]
        if chosen:
            judge = [k for k in numeric if k.startswith("judge_") and not k.endswith("_reference")]
            return chosen + judge
    judge = [k for k in numeric if k.startswith("judge_") and not k.endswith("_reference")]
    return judge or numeric


def compare(dense: dict, other: dict, tolerance: float = 0.05, all_metrics: bool = False) -> dict:
    """Rows ``{task, metric, dense, other, delta, relative, matching}`` plus tasks present in one file only."""
    from recoup.evaluate.metrics import matching

    rows = []
    d_res, o_res = dense["results"], other["results"]
    for task in d_res:
        if task not in o_res:
            continue
        for metric in headline(d_res[task], all_metrics):
            a, b = d_res[task].get(metric), o_res[task].get(metric)
            if not isinstance(b, (int, float)) or any(math.isnan(x) for x in (a, b)):
                continue
            higher = metric not in _LOWER_IS_BETTER
            rows.append({"task": task, "metric": metric, "dense": a, "other": b, "delta": b - a,
                         "relative": (b - a) / abs(a) if a else None, "n_dense": d_res[task].get("n"),
                         "n_other": o_res[task].get("n"), "matching": matching(a, b, tolerance, higher)})
    return {"dense": dense.get("model"), "other": other.get("model"), "tolerance": tolerance, "rows": rows,
            "only_dense": sorted(set(d_res) - set(o_res)), "only_other": sorted(set(o_res) - set(d_res))}


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.tolerance < 1:
        raise RecoupError(f"--tolerance is a fraction in [0, 1) (got {args.tolerance})")
    out = compare(_load(args.dense), _load(args.other), args.tolerance, args.all_metrics)
    if not out["rows"]:
        raise RecoupError("the two results files share no task metric to compare")
    print(f"dense: {out['dense']}   other: {out['other']}   matching = within {args.tolerance:.0%} of dense")
    print(f"{'task':<16} {'metric':<18} {'dense':>9} {'other':>9} {'delta':>9} {'rel':>8}  match")
    for r in out["rows"]:
        rel = f"{r['relative']:+.1%}" if r["relative"] is not None else "n/a"
        print(f"{r['task']:<16} {r['metric']:<18} {r['dense']:>9.4f} {r['other']:>9.4f} {r['delta']:>+9.4f} {rel:>8}  "
              f"{'yes' if r['matching'] else 'NO'}")
        if r["n_dense"] != r["n_other"]:
            print(f"{'':<16} (n differs: dense {r['n_dense']}, other {r['n_other']})")
    matched = sum(r["matching"] for r in out["rows"])
    print(f"matching: {matched}/{len(out['rows'])} metrics")
    for side in ("only_dense", "only_other"):
        if out[side]:
            print(f"{side.replace('_', ' in ')}: {', '.join(out[side])}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0
