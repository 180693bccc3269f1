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


def test_results_page_is_current():
    """docs/results.md is rebuilt from benchmarks/results by benchmarks/report.py; a changed result needs a rebuild."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_report", root / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    page = (DOCS / "results.md").read_text(encoding="utf-8")
    assert page == report.results_page(), "docs/results.md is stale: run python benchmarks/report.py"
    readme = root / "README.md"
    text = readme.read_text(encoding="utf-8")
    if report.START in text:  # the README's table, once the README carries the markers
        stale = "README results table is stale: run python benchmarks/report.py"
        assert text == report.splice(text, report.readme_table()), stale
