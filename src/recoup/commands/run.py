"""recoup run [RECIPE] [--out DIR] [--set key=value ...]"""

from __future__ import annotations

import argparse


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="run directory: stage outputs, cache and report (default runs/NAME)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, dotted keys, e.g. --set evaluate.limit=4 "
        "--set compress.8x.sparsity=0.6 (repeatable)",
    )
    p.add_argument("--store", default=None, help="results store (default $RECOUP_STORE or $RECOUP_HOME/results.sqlite)")
    p.add_argument(
        "--executor",
        default="local",
        help="job executor: local (default: sequential, in process) or ray (each stage a Ray task)",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join with --executor ray (default $RAY_ADDRESS, else a local cluster "
        "started and shut down for the run); the run directory must be on a shared file system",
    )
    p.add_argument("--no-report", action="store_true", help="skip the report at the end")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the recipe and print its stages; load no model, compute nothing",
    )


def register(sub) -> None:
    p = sub.add_parser(
        "run",
        help="run a recipe: compress -> evaluate -> recover -> evaluate -> report (resumable)",
        description="Run the stages of RECIPE (a YAML file, or a shipped recipe: default, sweep). "
        "Without RECIPE, the default: smollm2-135m evaluated dense, compressed 8x "
        "(50% SparseGPT + 4-bit), evaluated, a soft prompt learned and evaluated, the "
        "prompt transferred to a second compression level, and a report. Finished "
        "stages are never recomputed: run it again after an interruption to resume.",
    )
    p.add_argument("recipe", nargs="?", default=None, help="recipe YAML file (default: the shipped default recipe)")
    add_run_arguments(p)
    p.set_defaults(func=run)


def dry_run(recipe) -> int:
    from recoup.runs.plan import build_plan, describe_plan

    plan = build_plan(recipe, "dry-run")
    print(f"recipe {recipe.name} ({recipe.source}): valid; model {recipe.model}, {len(plan)} stage(s):")
    print("\n".join(describe_plan(plan)))
    return 0


def execute(recipe, args: argparse.Namespace) -> int:
    from pathlib import Path

    from recoup.runs.run import check_run_dir

    if args.out is not None:
        check_run_dir(Path(args.out).expanduser().resolve())  # also for --dry-run: one line before any work
    if getattr(args, "dry_run", False):
        return dry_run(recipe)
    from recoup.runs.executor import make_executor
    from recoup.runs.run import run_recipe
    from recoup.runs.store import Store

    executor = make_executor(args.executor, args.address)
    with Store(args.store) as store:
        outcome = run_recipe(recipe, out=args.out, store=store, executor=executor, report=not args.no_report)
    print(
        f"run {outcome.run_id}: {len(outcome.ran)} stage(s) computed, {len(outcome.cached)} reused, "
        f"{outcome.seconds:.0f} s"
    )
    print(f"store:  {outcome.store_path}")
    if outcome.report_path:
        print(f"report: {outcome.report_path}")
    if outcome.summary:
        print()
        print(outcome.summary)
    return 0


def run(args: argparse.Namespace) -> int:
    from recoup.recipe import load_recipe

    return execute(load_recipe(args.recipe, args.overrides), args)
