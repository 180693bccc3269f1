"""Task data: bigbench files out of a verified sdist, CNN/DM stories, `recoup compare`."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from recoup.cli import main
from recoup.data import bigbench
from recoup.errors import MissingData, RecoupError
from recoup.evaluate.tasks import summarization

SHARED = Path(__file__).resolve().parent / "data" / "llm-kick"  # LLM-KICK's files, copied unchanged


TASKS = {
    "qa_wikidata": {"examples": [{"input": "The capital of France is", "target": ["Paris", "paris"]}]},
    "xsum": {"examples": [{"input": "word " * 500, "target": "A summary.", "comment": "xsum-test-0"}]},
}


@pytest.fixture
def one_example_release(monkeypatch):
    """The fake task files hold one example each: make that the release's count for the test."""
    monkeypatch.setattr(bigbench, "EXAMPLES", {"qa_wikidata": 1, "xsum": 1})


def fake_sdist(path: Path, skip: str | None = None) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for task, inner in bigbench.TASK_FILES.items():
            if task == skip:
                continue
            data = json.dumps(TASKS[task]).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{inner}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fake_checkout(root: Path, examples: int = 1) -> Path:
    for task, inner in bigbench.TASK_FILES.items():
        f = root / "bigbench" / "benchmark_tasks" / inner
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({"examples": TASKS[task]["examples"] * examples}))
    return root


def test_bigbench_extracts_verified_task_files(tmp_path, monkeypatch, one_example_release):
    monkeypatch.setenv("RECOUP_HOME", str(tmp_path / "home"))
    assert not bigbench.installed()
    with pytest.raises(MissingData, match="RECOUP_BIGBENCH_DIR"):
        bigbench.load_task("qa_wikidata")
    sdist = tmp_path / "bigbench-1.0.0.tar.gz"
    digest = fake_sdist(sdist)
    with pytest.raises(RecoupError, match="sha256"):
        bigbench.extract(sdist)  # not the real sdist's hash
    bigbench.extract(sdist, digest)
    assert bigbench.installed()
    assert bigbench.load_task("qa_wikidata")["examples"][0]["target"] == ["Paris", "paris"]
    xsum = summarization.load("xsum", {})
    assert xsum[0]["bucket"] == "mid" and xsum[0]["reference"] == "A summary." and "word" in xsum[0]["prompt"]


def test_bigbench_missing_member_is_an_error(tmp_path, monkeypatch, one_example_release):
    monkeypatch.setenv("RECOUP_HOME", str(tmp_path / "home"))
    sdist = tmp_path / "b.tar.gz"
    digest = fake_sdist(sdist, skip="xsum")
    with pytest.raises(RecoupError, match="missing"):
        bigbench.extract(sdist, digest)


@pytest.mark.parametrize("sub", ["", "bigbench", "bigbench/benchmark_tasks"])
def test_bigbench_from_a_folder_the_user_names(tmp_path, monkeypatch, one_example_release, sub):
    monkeypatch.setenv("RECOUP_HOME", str(tmp_path / "home"))
    root = fake_checkout(tmp_path / "BIG-bench")
    monkeypatch.setenv("RECOUP_BIGBENCH_DIR", str(root / sub))
    bigbench.install()
    assert bigbench.installed()
    record = json.loads((bigbench.task_path("xsum").parent / "SOURCE.json").read_text())
    assert record["sha256"] == bigbench.task_sha256("xsum") and "folder" in record["origin"]
    assert summarization.load("xsum", {})[0]["reference"] == "A summary."


def test_bigbench_folder_of_another_version_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("RECOUP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RECOUP_BIGBENCH_DIR", str(fake_checkout(tmp_path / "bb", examples=3)))
    with pytest.raises(RecoupError, match="1.0.0"):
        bigbench.install()
    assert not bigbench.installed()


def test_bigbench_without_a_source_names_how_to_provide_it(tmp_path, monkeypatch):
    """No folder given and the index has no bigbench 1.0.0 (pip is asked; simulated here): one line, how to fix."""
    monkeypatch.setenv("RECOUP_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RECOUP_BIGBENCH_DIR", raising=False)

    def no_release(dest):
        raise MissingData("the package index does not serve bigbench==1.0.0 (No matching distribution)")

    monkeypatch.setattr(bigbench, "pip_download", no_release)
    with pytest.raises(MissingData, match="RECOUP_BIGBENCH_DIR") as err:
        bigbench.install()
    assert "\n" not in str(err.value)


def test_no_package_file_host_in_the_code():
    src = Path(__file__).resolve().parents[1] / "src"
    hosts = ("files." + "pythonhosted", "pypi" + ".org/packages", "download" + ".pytorch")
    hits = [f for f in src.rglob("*.py") if any(h in f.read_text() for h in hosts)]
    assert hits == []


@pytest.mark.skipif(not (SHARED / "cnn_dm_stories.jsonl").is_file(), reason="LLM-KICK stories missing")
def test_cnndm_reference_is_the_highlights_and_left_out_of_the_prompt():
    stories = summarization.load("cnndm", {"cnndm_file": str(SHARED / "cnn_dm_stories.jsonl")})
    assert len(stories) == 90  # 30 per bucket (the file has no final newline)
    assert {s["bucket"] for s in stories} == {"small", "mid", "large"}
    first = stories[0]
    assert "@highlight" not in first["prompt"] and first["prompt"].startswith("Summarize the given story")
    assert first["reference"].startswith("The incident occurred around 6 a.m.")


def results(path: Path, acc: float, ppl: float) -> str:
    path.write_text(
        json.dumps(
            {
                "model": path.stem,
                "results": {
                    "arc_easy": {"acc": acc, "acc_stderr": 0.02, "acc_norm": 0.40, "n": 570},
                    "ppl:ptb": {"ppl": ppl, "nll": 3.0, "tokens": 100, "windows": 2},
                },
            }
        )
    )
    return str(path)


def test_compare_marks_matching_within_five_percent(tmp_path, capsys):
    dense = results(tmp_path / "dense.json", 0.50, 20.0)
    other = results(tmp_path / "other.json", 0.48, 22.0)
    assert main(["compare", dense, other, "--json", str(tmp_path / "cmp.json")]) == 0
    out = capsys.readouterr().out
    rows = {(r["task"], r["metric"]): r for r in json.loads((tmp_path / "cmp.json").read_text())["rows"]}
    assert rows[("arc_easy", "acc")]["matching"] is True  # -4%
    assert rows[("arc_easy", "acc_norm")]["matching"] is True
    assert rows[("ppl:ptb", "ppl")]["matching"] is False  # +10% perplexity
    assert ("arc_easy", "acc_stderr") not in rows and "matching: 2/3" in out


def test_compare_bad_files_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["compare", str(bad), str(bad)]) == 2
    assert main(["compare", str(tmp_path / "none.json"), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "is not JSON" in err and "no such results file" in err
