"""The CLI reference (docs/cli.md), built from the real parsers of :func:`recoup.cli.build_parser`.

    python -m recoup.commands.reference            # rewrite docs/cli.md
    python -m recoup.commands.reference --check    # exit 1 when docs/cli.md differs from the parsers

Every subcommand's ``--help`` text is rendered at a fixed width (100 columns), so the page does not depend on the
terminal it was built in; ``tests/test_docs.py`` fails when the page is stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

WIDTH = 100
HEADER = """# CLI reference

Generated from the parsers in `src/recoup/cli.py` by `python -m recoup.commands.reference`; do not edit by hand
(`tests/test_docs.py` fails when this page and the parsers differ). Every flag of `recoup compress`, `recoup eval`,
`recoup recover` and `recoup export` is also a key of the matching recipe step, spelled without the dashes
(`--group-size 64` is `group_size: 64`).
"""


def _fixed_width(parser: argparse.ArgumentParser) -> None:
    cls = parser.formatter_class
    parser.formatter_class = lambda prog, cls=cls: cls(prog, width=WIDTH, max_help_position=32)


def _subparsers(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of each subcommand, in the order the CLI registers them."""
    found = []
    for action in parser._actions:  # argparse keeps subcommands here; there is no public accessor
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            found += [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return found


def render() -> str:
    """The whole page as Markdown."""
    from recoup.cli import build_parser

    parser = build_parser()
    parser.prog = "recoup"
    commands = _subparsers(parser)
    lines = [HEADER, "| command | what it does |", "|---|---|"]
    lines += [f"| [`recoup {name}`](#recoup-{name.replace('_', '-')}) | {text} |" for name, text, _ in commands]
    _fixed_width(parser)
    lines += ["", "## recoup", "", "```text", parser.format_help().rstrip(), "```"]
    for name, _, sub in commands:
        _fixed_width(sub)
        lines += ["", f"## recoup {name}", "", "```text", sub.format_help().rstrip(), "```"]
    return "\n".join(lines) + "\n"


def default_path() -> Path:
    """docs/cli.md of the source checkout this module was imported from."""
    return Path(__file__).resolve().parents[3] / "docs" / "cli.md"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m recoup.commands.reference", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the page is stale instead of writing it")
    ap.add_argument("--out", type=Path, default=None, help="the page to write or check (default docs/cli.md)")
    args = ap.parse_args(argv)
    out = args.out or default_path()
    text = render()
    if args.check:
        if not out.is_file() or out.read_text(encoding="utf-8") != text:
            sys.stderr.write(f"{out} is stale: run python -m recoup.commands.reference\n")
            return 1
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
