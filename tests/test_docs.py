"""The CLI reference page is generated from the parsers; it fails here when someone changes a flag and forgets it."""

from __future__ import annotations

from pathlib import Path

from recoup.commands.reference import main, render

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_cli_reference_is_current():
    page = DOCS / "cli.md"
    assert page.is_file(), "docs/cli.md is missing: run python -m recoup.commands.reference"
    assert page.read_text(encoding="utf-8") == render(), "docs/cli.md is stale: run python -m recoup.commands.reference"


def test_cli_reference_has_every_command_and_flag():
    from recoup.cli import COMMANDS

    text = render()
    for name in COMMANDS:
        assert f"## recoup {name.replace('_', '-')}\n" in text
    for flag in ("--group-size", "--true-sequential", "--recovery", "--suite", "--format"):
        assert flag in text


def test_check_mode_fails_on_a_stale_page(tmp_path, capsys):
    stale = tmp_path / "cli.md"
    stale.write_text(render().replace("--group-size", "--groupsize", 1), encoding="utf-8")
    assert main(["--check", "--out", str(stale)]) == 1
    assert main(["--out", str(stale)]) == 0
    assert main(["--check", "--out", str(stale)]) == 0
