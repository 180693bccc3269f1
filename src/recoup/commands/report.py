"""recoup report RUN|--all [--out DIR]"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "report",
        help="write a run's Markdown report and PNG plots from the results store",
        description="Write report.md and PNG plots (per-task bars, gap closed, training curve, "
        "sweep curves) for RUN, or for every run with --all, from the results store.",
    )
    p.add_argument("run", nargs="?", default=None, help="run id (or unique prefix, or recipe name)")
    p.add_argument("--all", action="store_true", help="a report for every run in the store")
    p.add_argument(
        "--out",
        default=None,
        help="output directory (default: the run's report/ directory; with --all, one sub-directory per run)",
    )
    p.add_argument("--store", default=None, help="results store (default $RECOUP_STORE or $RECOUP_HOME/results.sqlite)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from recoup.errors import RecoupError
    from recoup.runs.report import write_report
    from recoup.runs.store import Store

    if bool(args.all) == bool(args.run):
        raise RecoupError("give a RUN id or --all (not both)")
    with Store(args.store) as store:
        runs = store.runs() if args.all else [store.run(args.run)]
        if not runs:
            raise RecoupError(f"no runs in {store.path}")
        for r in runs:
            if args.out:
                out = Path(args.out) / r["run_id"] if args.all else Path(args.out)
            else:
                out = Path(r["run_dir"]) / "report"
            path, summary = write_report(store, r["run_id"], out)
            print(f"{r['run_id']}: {path}")
            if not args.all:
                print(f"\n{summary}")
    return 0
