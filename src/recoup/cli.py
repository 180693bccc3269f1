"""The ``recoup`` command: parses arguments, calls the library, prints results.

Errors in what the user gave (RecoupError, bad flag values) print one line to stderr and exit 2.
SIGTERM is handled like Ctrl-C (KeyboardInterrupt: finished stages kept, one line, exit 130); every log
line and error line passes through :func:`recoup.safeio.redact`, so a secret never reaches the terminal.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys

from recoup import __version__
from recoup.errors import RecoupError
from recoup.safeio import SECRET_ENV, install_log_redaction, redact, secret_env

# Explicit list of subcommand modules (docs/design.md, house style 2).
COMMANDS = [
    "setup",
    "eval",
    "compress",
    "run",
    "sweep",
    "runs",
    "show",
    "report",
    "compare_recovery",
    "recover",
    "compare",
    "export",
    "lm_eval",
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="recoup",
        description="Compress LLMs, measure what it cost on knowledge-intensive work, "
        "and win it back with prompts and adapters.",
    )
    parser.add_argument("--version", action="version", version=f"recoup {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(f"recoup.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    install_log_redaction()
    for name in SECRET_ENV:  # tokens in the environment never reach a log line, error line or written file
        secret_env(name)
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command is None:
        parser.print_help()
        return 2
    previous = _sigterm_as_interrupt()
    try:
        return int(args.func(args) or 0)
    except RecoupError as exc:
        sys.stderr.write(redact(f"recoup {args.command}: error: {' '.join(str(exc).split())}") + "\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("recoup: interrupted; finished stages are kept\n")
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _sigterm_as_interrupt():
    """Turn SIGTERM into KeyboardInterrupt (main thread only); returns the previous handler or None."""
    try:
        return signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread (e.g. main() called from a worker thread)
        return None


if __name__ == "__main__":
    sys.exit(main())
