"""recoup runs: list the runs in the results store."""

from __future__ import annotations

import argparse
import time


def register(sub) -> None:
    p = sub.add_parser(
        "runs",
        help="list the runs in the results store",
        description="List runs recorded in the results store (id, name, status, stages done, time).",
    )
    p.add_argument("--store", default=None, help="results store (default $RECOUP_STORE or $RECOUP_HOME/results.sqlite)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from recoup.runs.store import Store

    with Store(args.store) as store:
        rows = store.runs()
        if not rows:
            print(f"no runs in {store.path}")
            return 0
        print(f"{'run':<28} {'name':<16} {'status':<12} {'stages':>7} {'updated':<17} run dir")
        for r in rows:
            stages = store.stages(r["run_id"])
            done = sum(s["status"] == "done" for s in stages)
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["updated"]))
            print(
                f"{r['run_id']:<28} {r['name']:<16} {store.effective_status(r):<12} {done:>3}/{len(stages):<3} "
                f"{when:<17} {r['run_dir']}"
            )
    return 0
