"""The knowledge-recovery study's tune rows (``benchmarks/recover_knowledge.py``): the ``tune:PARTS:OBJ`` grammar,
the skip of parts an artifact cannot tune, the fitted row being a new artifact measured as the model with nothing
attached, and the report's zero-extra-parameter budget line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
from helpers import save_tiny
from test_run import write_corpus

from recoup.artifact.store import read_manifest
from recoup.cli import main

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(BENCH))
    try:
        import recover_knowledge
        import recover_knowledge_report

        yield recover_knowledge, recover_knowledge_report
    finally:
        sys.path.remove(str(BENCH))


def test_tune_row_grammar(study):
    rk, _ = study
    row = rk.parse_row("tune:norms+scales:kd+squarehead")
    assert (row.method, row.parts, row.objective) == ("tune", ("scales", "norms"), "kd+squarehead")
    assert rk.parse_row("tune:weights:lm").parts == ("weights",)
    bw = rk.parse_row("tune:scales:kd:bw=8")
    assert (bw.parts, bw.objective, bw.blockwise, row.blockwise) == (("scales",), "kd", 8, 0)
    assert rk.recover_flat(bw, argparse.Namespace(seed=0, data="ptb", steps=None))["blockwise_steps"] == 8
    bad_rows = (
        "tune:scale:kd",
        "tune:scales:foo",
        "tune:scales+scales:kd",
        "tune::kd",
        "tune:scales",
        "tune:scales:kd:bw=0",
    )
    for bad in bad_rows:
        with pytest.raises(SystemExit, match="bad row"):
            rk.parse_row(bad)
    flat = rk.recover_flat(row, argparse.Namespace(seed=0, data="ptb,wiki", steps=40))
    assert flat == {
        "method": "tune",
        "seed": 0,
        "trainable": "scales,norms",
        "data": "ptb,wiki",
        "objective": "kd+squarehead",
        "steps": 40,
    }


def test_tune_skip_reasons(study):
    rk, _ = study
    quant, sparse = {"recipe": {"bits": 4}}, {"recipe": {"sparsity": 0.5}}
    scales, weights = rk.parse_row("tune:scales+norms:kd"), rk.parse_row("tune:weights+norms:kd")
    assert "not quantized" in rk.tune_skip(scales, sparse, "A")
    assert "integer codes" in rk.tune_skip(weights, quant, "A")
    assert rk.tune_skip(scales, quant, "A") is None and rk.tune_skip(weights, sparse, "A") is None
    assert rk.tune_skip(rk.parse_row("eora:8"), sparse, "A") is None
    assert "calibration" in rk.tune_skip(rk.parse_row("tune:scales:kd:bw=4"), quant, "A")
    cal = {**quant, "calibration": {"corpus": "ptb", "nsamples": 4, "seqlen": 48}}
    assert rk.tune_skip(rk.parse_row("tune:scales:kd:bw=4"), cal, "A") is None


def _row(params: float, pct: float, arc: float) -> dict:
    return {"parameters": params, "parameters_pct": pct, "arc_easy": arc}


def test_zero_extra_parameter_budget_line(study):
    _, report = study
    rows = {
        "compressed": _row(0, 0.0, 0.3),
        "soft-prompt:kd": _row(10, 0.01, 0.5),
        "tune:scales+norms:kd": _row(0, 0.0, 0.4),
        "tune:scales+norms:kd+squarehead": _row(0, 0.0, 0.35),
    }
    ana = {n: {"arc_easy": {"delta": r["arc_easy"] - 0.3}, "ppl_ptb": {"gap_closed": 0.5}} for n, r in rows.items()}
    lines = report.budget_lines(rows, ana)
    assert lines[2].startswith(f"- {report.ZERO}: `tune:scales+norms:kd` (0.00%): +10.0 points")
    assert lines[3].startswith("- <= 0.1%") and "`soft-prompt:kd`" in lines[3]
    rows.pop("tune:scales+norms:kd"), rows.pop("tune:scales+norms:kd+squarehead")
    assert report.budget_lines(rows, ana)[2] == f"- {report.ZERO}: no row"


def test_tune_row_fits_a_new_artifact(study, tmp_path):
    """A tune row on a tiny quantized artifact: a new artifact in the workdir (0 parameters, its tuning record),
    which the study measures as the model with nothing attached."""
    rk, _ = study
    dense = tmp_path / "dense"
    save_tiny(dense, "llama", hidden=64, layers=2)
    corpus = str(write_corpus(tmp_path / "text.txt", n_words=3000))
    art = tmp_path / "art"
    calib = ["--calib", corpus, "--nsamples", "4", "--seqlen", "48", "--device", "cpu"]
    assert (
        main(
            ["compress", str(dense), "--method", "rtn", "--bits", "4", "--group-size", "32", "--out", str(art)] + calib
        )
        == 0
    )
    row = rk.parse_row("tune:scales+norms:kd")
    args = argparse.Namespace(seed=0, data=corpus, steps=2)
    recovery, fitted = rk.fit_row(row, str(art), args, tmp_path / "work")
    assert Path(recovery) == tmp_path / "work" / "tune-scales+norms-kd"
    assert fitted["parameters"] == 0 and fitted["tuning"]["trainable"] == ["scales", "norms"]
    assert fitted["tuning"]["train"]["steps"] == 2 and fitted["tuning"]["objective"] == "kd"
    assert read_manifest(recovery)["tuning"][-1]["compression_fingerprint"]["unchanged"]
    assert rk.measured_model(row, str(art), str(dense), recovery) == (recovery, None)
    assert rk.measured_model(rk.parse_row("compressed"), str(art), str(dense), None) == (str(art), None)

    # a study stopped after this fit measures it on rerun without refitting; other settings refit
    record = Path(recovery) / "recoup_run.json"
    stamp = record.stat().st_mtime_ns
    again, resumed = rk.fit_row(row, str(art), args, tmp_path / "work")
    assert again == recovery and resumed["fit_resumed"] and record.stat().st_mtime_ns == stamp
    assert resumed["fit_seconds"] == json.loads(record.read_text())["total_seconds"] and resumed["parameters"] == 0
    assert resumed["tuning"] == fitted["tuning"]
    _, refit = rk.fit_row(row, str(art), argparse.Namespace(seed=0, data=corpus, steps=3), tmp_path / "work")
    assert "fit_resumed" not in refit and refit["tuning"]["train"]["steps"] == 3
