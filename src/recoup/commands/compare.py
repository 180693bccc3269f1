"""recoup compare DENSE.json OTHER.json: per-task deltas and LLM-KICK "matching" (within 5% of dense)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from recoup.errors import RecoupError
from recoup.safeio import dumps


def register(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="per-task deltas of a run against the dense run, and which tasks match",
        description="Compare two `recoup eval --json` results. A task metric 'matches' when it is "
        "within the tolerance (5%%, LLM-KICK's definition) of the dense value.",
    )
    p.add_argument("dense", help="results JSON of the dense (reference) model")
    p.add_argument("other", help="results JSON of the compressed / recovered model")
    p.add_argument("--tolerance", type=float, default=0.05, help="relative tolerance for matching (default 0.05)")
    p.add_argument(
        "--all-metrics", action="store_true", help="compare every metric, not only each task's headline ones"
    )
    p.add_argument("--json", default=None, help="write the comparison JSON here")
    p.set_defaults(func=run)


def _load(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecoupError(f"no such results file: '{path}'") from None
    except IsADirectoryError:
        raise RecoupError(f"'{path}' is a directory; give a results JSON file") from None
    except UnicodeDecodeError:
        raise RecoupError(f"'{path}' is not UTF-8 text (a binary file?); give a results JSON file") from None
    except json.JSONDecodeError as exc:
        raise RecoupError(f"'{path}' is not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise RecoupError(f"'{path}' is not a recoup results file (write one with `recoup eval ... --json PATH`)")
    return data


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.tolerance < 1:
        raise RecoupError(f"--tolerance is a fraction in [0, 1) (got {args.tolerance})")
    from recoup.runs.metrics import compare_results

    out = compare_results(_load(args.dense), _load(args.other), args.tolerance, args.all_metrics)
    if not out["rows"]:
        raise RecoupError("the two results files share no task metric to compare")
    print(f"dense: {out['dense']}   other: {out['other']}   matching = within {args.tolerance:.0%} of dense")
    print(f"{'task':<16} {'metric':<18} {'dense':>9} {'other':>9} {'delta':>9} {'rel':>8}  match")
    for r in out["rows"]:
        rel = f"{r['relative']:+.1%}" if r["relative"] is not None else "n/a"
        print(
            f"{r['task']:<16} {r['metric']:<18} {r['dense']:>9.4f} {r['other']:>9.4f} {r['delta']:>+9.4f} {rel:>8}  "
            f"{'yes' if r['matching'] else 'NO'}"
        )
        if r["n_dense"] != r["n_other"]:
            print(f"{'':<16} (n differs: dense {r['n_dense']}, other {r['n_other']})")
    matched = sum(r["matching"] for r in out["rows"])
    print(f"matching: {matched}/{len(out['rows'])} metrics")
    for side in ("only_dense", "only_other"):
        if out[side]:
            print(f"{side.replace('_', ' in ')}: {', '.join(out[side])}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0
