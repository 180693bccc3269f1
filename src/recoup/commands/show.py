"""recoup show RUN: one run's stages and metrics from the results store."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "show",
        help="print one run: stages, metrics, summary",
        description="Print a run from the results store: its stages (status, time, attempts, reuse), "
        "every metric row (task, metric, value, n, stderr) and its summary.",
    )
    p.add_argument("run", help="run id (or a unique prefix, or a recipe name for its latest run)")
    p.add_argument("--store", default=None, help="results store (default $RECOUP_STORE or $RECOUP_HOME/results.sqlite)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from recoup.runs.store import Store

    with Store(args.store) as store:
        r = store.run(args.run)
        print(f"run {r['run_id']} ({r['name']}), status {store.effective_status(r)}, dir {r['run_dir']}")
        if r["report"]:
            print(f"report: {r['report']}")
        print(f"\n{'stage':<32} {'status':<8} {'seconds':>8} {'attempts':>8} {'reused':>6}")
        for s in store.stages(r["run_id"]):
            secs = f"{s['seconds']:.1f}" if s["seconds"] is not None else "-"
            print(f"{s['stage']:<32} {s['status']:<8} {secs:>8} {s['attempts']:>8} {s['cache_hits']:>6}")
            if s["error"]:
                print(f"    error: {s['error']}")
        rows = store.metrics(r["run_id"])
        if rows:
            print(f"\n{'stage':<32} {'task':<16} {'metric':<20} {'value':>12} {'n':>6} {'stderr':>9}")
            for m in rows:
                err = f"{m['stderr']:.4f}" if m["stderr"] is not None else "-"
                n = m["n"] if m["n"] is not None else "-"
                print(f"{m['stage']:<32} {m['task']:<16} {m['metric']:<20} {m['value']:>12.4f} {n:>6} {err:>9}")
        if r["summary"]:
            print(f"\n{r['summary']}")
    return 0
