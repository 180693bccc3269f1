"""`recoup setup`: degrades, never breaks; a table of every item; exit 0 iff every required item is present."""

from __future__ import annotations

import pytest

from recoup import setup as setup_mod
from recoup.cli import main
from recoup.data import bigbench
from recoup.errors import MissingData, RecoupError
from recoup.setup import SetupItem


def _items(tmp_path, required_ok: bool = True) -> list[SetupItem]:
    """Two required items (one that installs, one already there) and the real optional BIG-bench item."""
    marker = tmp_path / "pack-installed"

    def install_pack():
        if not required_ok:
            raise RecoupError("pip could not install fake-pack==1: No matching distribution found")
        marker.write_text("ok")

    return [
        SetupItem("fake-pack==1", True, "ppl:fake", lambda: str(marker) if marker.exists() else None, install_pack),
        SetupItem("fake-model", True, "the default recipe", lambda: str(tmp_path), lambda: None),
        setup_mod.ITEMS[-1],
    ]


@pytest.fixture
def no_bigbench_anywhere(tmp_path, monkeypatch):
    monkeypatch.setenv("RECOUP_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RECOUP_BIGBENCH_DIR", raising=False)
    calls = []

    def index_without_it(dest):  # what pip answers today: simulated, the test never needs the network
        calls.append(dest)
        raise MissingData("the package index does not serve bigbench==1.0.0 (No matching distribution found)")

    monkeypatch.setattr(bigbench, "pip_download", index_without_it)
    return calls


def test_unavailable_optional_source_is_reported_and_setup_exits_0(tmp_path, monkeypatch, capsys, no_bigbench_anywhere):
    assert setup_mod.ITEMS[-1].name == "bigbench task files" and not setup_mod.ITEMS[-1].required
    monkeypatch.setattr(setup_mod, "ITEMS", _items(tmp_path))
    assert main(["setup"]) == 0
    out = capsys.readouterr().out
    assert no_bigbench_anywhere, "pip was asked for the release"
    rows = {line.split("  ")[0]: line for line in out.splitlines()}
    assert "installed" in rows["fake-pack==1"] and "already there" in rows["fake-model"]
    bb = rows["bigbench task files"]
    assert "unavailable" in bb and "qa_wikidata, xsum" in bb and "RECOUP_BIGBENCH_DIR" in bb
    assert "optional item(s) unavailable: bigbench task files" in out
    # a second run installs nothing it has, and still reports the optional item
    assert main(["setup"]) == 0
    assert "already there" in capsys.readouterr().out.split("fake-pack==1", 1)[1].splitlines()[0]


def test_missing_required_item_exits_non_zero_with_the_reason(tmp_path, monkeypatch, capsys, no_bigbench_anywhere):
    monkeypatch.setattr(setup_mod, "ITEMS", _items(tmp_path, required_ok=False))
    assert main(["setup"]) == 1
    out = capsys.readouterr().out
    assert "missing required item(s): fake-pack==1" in out and "No matching distribution" in out


def test_check_installs_nothing(tmp_path, monkeypatch, capsys, no_bigbench_anywhere):
    monkeypatch.setattr(setup_mod, "ITEMS", _items(tmp_path))
    assert main(["setup", "--check"]) == 1  # the fake pack is not installed and --check does not install it
    out = capsys.readouterr().out
    assert not (tmp_path / "pack-installed").exists() and not no_bigbench_anywhere
    assert "missing" in out and "RECOUP_BIGBENCH_DIR" in out
    assert main(["setup", "--check", "--force"]) == 2


def test_a_folder_named_by_the_user_installs_the_optional_item(tmp_path, monkeypatch, capsys, no_bigbench_anywhere):
    import json

    monkeypatch.setattr(bigbench, "EXAMPLES", {"qa_wikidata": 1, "xsum": 1})
    for task, inner in bigbench.TASK_FILES.items():
        f = tmp_path / "BIG-bench" / "bigbench" / "benchmark_tasks" / inner
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({"examples": [{"input": "x", "target": "y"}]}))
    monkeypatch.setenv("RECOUP_BIGBENCH_DIR", str(tmp_path / "BIG-bench"))
    monkeypatch.setattr(setup_mod, "ITEMS", _items(tmp_path))
    assert main(["setup"]) == 0
    assert "ready: every item is present" in capsys.readouterr().out and not no_bigbench_anywhere
