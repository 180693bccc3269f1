"""recoup lm-eval ARGS...: lm-evaluation-harness's command line with the ``recoup`` model registered."""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    p = sub.add_parser(
        "lm-eval",
        add_help=False,
        prefix_chars="\0",
        help="run lm-evaluation-harness with --model recoup registered (needs recoup[lm-eval])",
        description="Every argument goes to lm-eval's command line, e.g. `recoup lm-eval --model recoup "
        "--model_args pretrained=ARTIFACT,recovery=DIR,batch_size=16 --tasks arc_easy`. "
        "model_args: pretrained, recovery, dtype, device, batch_size, max_length.",
    )
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="arguments for lm-eval")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from recoup.errors import RecoupError

    try:
        from lm_eval.__main__ import cli_evaluate

        import recoup.integrations.lm_eval  # noqa: F401  (registers --model recoup)
    except ImportError as exc:
        raise RecoupError(f"lm-evaluation-harness is not installed ({exc}); pip install 'recoup[lm-eval]'") from None
    saved = sys.argv
    sys.argv = ["lm-eval", *args.lm_eval_args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
