"""recoup eval MODEL --tasks ..."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    from recoup.commands.flags import add_job_arguments

    p = sub.add_parser(
        "eval",
        help="evaluate a model, an artifact, or either with a recovery attached",
        description="Evaluate MODEL (smollm2-135m, a .gguf file, a local HF directory, a recoup "
        "artifact or a hub id) on perplexity (ppl:ptb, ppl:wiki, ppl:FILE) and tasks. "
        "Every flag but --recovery and --json is also a key of a recipe's evaluate section.",
    )
    add_job_arguments(p, "evaluate")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from recoup.commands.flags import job_from_args
    from recoup.runs.stages import evaluate

    job = job_from_args(args, "evaluate")
    out = evaluate(job)
    for task, res in out["results"].items():
        main_metric = {k: v for k, v in res.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        shown = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(main_metric.items())[:6]
        )
        print(f"{task}: {shown}")
        if res.get("judge_error"):
            print(f"{task}: judge error after {res.get('n_judged', 0)} judged example(s), kept: {res['judge_error']}")
    for task, reason in out.get("skipped", {}).items():
        print(f"{task}: skipped: {reason}")
    if job.json:
        print(f"wrote {job.json}")
    return 0
