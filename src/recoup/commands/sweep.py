"""recoup sweep [RECIPE] [--methods ...] [--sparsity ...] [--bits ...]"""

from __future__ import annotations

import argparse

from recoup.commands.run import add_run_arguments, execute


def register(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="compress and evaluate over a grid: methods x sparsity levels x bits",
        description="Run a sweep recipe (default: the shipped 'sweep' recipe): every cell of the grid "
        "methods x sparsity x bits is compressed and evaluated as an independent job, "
        "plus the dense reference; the report plots each task's metric against "
        "sparsity per method with the 5% matching band. Resumable like `recoup run`.",
    )
    p.add_argument("recipe", nargs="?", default="sweep", help="recipe with a sweep section (default: shipped 'sweep')")
    p.add_argument("--methods", default=None, help="comma-separated methods, e.g. magnitude,wanda,sparsegpt")
    p.add_argument("--sparsity", default=None, help="comma-separated sparsity levels, e.g. 0.3,0.5,0.7")
    p.add_argument("--bits", default=None, help="comma-separated bits per cell; 'none' = unquantized (e.g. none,4)")
    add_run_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from recoup.errors import RecoupError
    from recoup.recipe import load_recipe

    overrides = list(args.overrides)
    if args.methods:
        overrides.append(f"sweep.methods=[{args.methods}]")
    if args.sparsity:
        overrides.append(f"sweep.sparsity=[{args.sparsity}]")
    if args.bits:
        overrides.append(
            "sweep.bits=["
            + ",".join(
                "null" if b.strip().lower() in ("none", "null", "16") else b.strip() for b in args.bits.split(",")
            )
            + "]"
        )
    recipe = load_recipe(args.recipe, overrides)
    if recipe.sweep is None:
        raise RecoupError(
            f"recipe '{args.recipe}' has no sweep section (methods, sparsity, bits); "
            f"see `recoup sweep` with the shipped 'sweep' recipe"
        )
    return execute(recipe, args)
