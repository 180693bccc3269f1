"""recoup recover MODEL --method soft-prompt|idp|lora|cpet|hard-prompt|... --out DIR

The flags are the keys of the recovery methods' configs (:mod:`recoup.recover.methods`), generated
from them: a flag that does not belong to the chosen method is one clear error.
"""

from __future__ import annotations

import argparse


def register(sub) -> None:
    from recoup.commands.flags import add_job_arguments
    from recoup.recover.methods import RECOVERIES

    methods = "; ".join(f"{n}: {RECOVERIES.get(n).help}" for n in RECOVERIES.names())
    p = sub.add_parser(
        "recover",
        help="learn a recovery (soft prompt, IDP pool, LoRA, CPET ...) on a model or artifact",
        description="Learn a recovery on MODEL (usually a compressed artifact), whose weights stay "
        "bit-identical, and save it to --out; attach it with `recoup eval ... --recovery "
        f"DIR` to this or any model of the same hidden size. Methods: {methods}. Every "
        "flag is also a key of a recipe's recover step.",
    )
    add_job_arguments(p, "recover")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from recoup.commands.flags import job_from_args
    from recoup.errors import RecoupError
    from recoup.runs.stages import best_ppl, recover

    if args.method is None or args.out is None:
        raise RecoupError("give --method M and --out DIR")
    job = job_from_args(args, "recover")
    s = recover(job)
    if "steps" in s:
        print(
            f"{job.method}: {s['steps']} steps, {s['tokens']} tokens, {s['seconds']:.1f}s "
            f"({s['cpu_seconds'] or 0:.1f} CPU s); best validation ppl {best_ppl(s)} (step {s['best_step']}); "
            f"{s['parameters']} parameters"
        )
    else:
        print(f"{job.method}: {s['parameters']} trainable parameters")
    print(f"saved to {s['out']}")
    return 0
