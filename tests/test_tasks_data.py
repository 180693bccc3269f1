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
from recoup.errors import RecoupError
from recoup.evaluate.tasks import summarization

SHARED = Path(__file__).resolve().parent / "data" / "llm-kick"  # LLM-KICK's files, copied unchanged


def fake_sdist(path: Path, skip: str | None = None) -> str:
    tasks = {"qa_wikidata": {"examples": [{"input": "The capital of France is", "target": ["Paris", "paris"]}]},
             "xsum": {"examples": [{"input": "word " * 500, "target": "A summary.", "comment": "xsum-test-0"}]}}
    with tarfile.open(path, "w:gz") as tar:
        for task, inner in bigbench.TASK_FILES.items():
            if task == skip:
                continue
            data = json.dumps(tasks[task]).encode()
            info = tarfile.TarInfo(inner)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bigbench_extracts_verified_task_files(tmp_path, monkeypatch):
    monkeypatch.setenv("RECOUP_HOME", str(tmp_path / "home"))
    assert not bigbench.installed()
    with pytest.raises(RecoupError, match="recoup setup"):
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


def test_bigbench_missing_member_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("RECOUP_HOME", str(tmp_path / "home"))
    sdist = tmp_path / "b.tar.gz"
    digest = fake_sdist(sdist, skip="xsum")
    with pytest.raises(RecoupError, match="missing"):
        bigbench.extract(sdist, digest)


def test_setup_step_is_registered():
    from recoup.setup import EXTRA_STEPS

    assert any(name == bigbench.SETUP_STEP and done is bigbench.installed for name, done, _ in EXTRA_STEPS)


@pytest.mark.skipif(not (SHARED / "cnn_dm_stories.jsonl").is_file(), reason="LLM-KICK stories missing")
def test_cnndm_reference_is_the_highlights_and_left_out_of_the_prompt():
    stories = summarization.load("cnndm", {"cnndm_file": str(SHARED / "cnn_dm_stories.jsonl")})
    assert len(stories) == 90  # 30 per bucket (the file has no final newline)
    assert {s["bucket"] for s in stories} == {"small", "mid", "large"}
    first = stories[0]
    assert "@highlight" not in first["prompt"] and first["prompt"].startswith("Summarize the given story")
    assert first["reference"].startswith("The incident occurred around 6 a.m.")


def results(path: Path, acc: float, ppl: float) -> str:
    path.write_text(json.dumps({"model": path.stem, "results": {
        "arc_easy": {"acc": acc, "acc_stderr": 0.02, "acc_norm": 0.40, "n": 570},
        "ppl:ptb": {"ppl": ppl, "nll": 3.0, "tokens": 100, "windows": 2}}}))
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
