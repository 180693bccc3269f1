"""Reports from the store: matching marks, gap closed, summary numbers, plots (incl. the sweep curve)."""

from __future__ import annotations

import re

import pytest

from recoup.evaluate.metrics import matching
from recoup.runs.metrics import gap_closed, metric_rows, primary_metric
from recoup.runs.report import load_view, summary_paragraph, write_report
from recoup.runs.store import Store

PNG = b"\x89PNG\r\n\x1a\n"


def _eval(store: Store, run_id: str, pos: int, stage: str, labels: dict, results: dict) -> None:
    store.plan_stage(run_id, stage, pos, "evaluate", f"k{pos}", f"/x/{pos}", labels)
    evaluation = {"results": results, "protocol": {"seqlen": 512}}
    store.stage_finished(run_id, stage, {"evaluation": evaluation}, False, 1.0, metric_rows(evaluation), {})


def recovery_store(path, second: bool = False) -> tuple[Store, str]:
    store = Store(path)
    run_id = "demo-1"
    store.start_run(
        run_id,
        "demo",
        {"name": "demo", "model": "m", "report": {"matching": 0.05}, "evaluate": {"tasks": ["ppl:ptb", "arc_easy"]}},
        "r.yaml",
        "/x",
    )

    def mc(acc):
        return {
            "acc": acc,
            "acc_stderr": 0.02,
            "acc_norm": acc,
            "acc_norm_stderr": 0.02,
            "n": 200,
            "protocol": {"split": "test"},
            "examples": [{"id": 1}],
        }

    _eval(
        store,
        run_id,
        0,
        "eval:dense",
        {"role": "dense", "compression": "dense"},
        {"ppl:ptb": {"ppl": 20.0, "nll": 3.0, "windows": 16}, "arc_easy": mc(0.60)},
    )
    _eval(
        store,
        run_id,
        1,
        "eval:8x",
        {"role": "compressed", "compression": "8x", "method": "sparsegpt", "sparsity": 0.5, "bits": 4},
        {"ppl:ptb": {"ppl": 30.0, "nll": 3.4, "windows": 16}, "arc_easy": mc(0.50)},
    )
    _eval(
        store,
        run_id,
        2,
        "eval:8x+p",
        {"role": "recovered", "compression": "8x", "recovery": "p"},
        {"ppl:ptb": {"ppl": 20.8, "nll": 3.03, "windows": 16}, "arc_easy": mc(0.55)},
    )
    _eval(
        store,
        run_id,
        3,
        "eval:s60",
        {"role": "compressed", "compression": "s60", "method": "sparsegpt", "sparsity": 0.6},
        {"ppl:ptb": {"ppl": 40.0, "nll": 3.7, "windows": 16}, "arc_easy": mc(0.45)},
    )
    _eval(
        store,
        run_id,
        4,
        "eval:s60+p",
        {"role": "transfer", "compression": "s60", "recovery": "p", "trained_on": "8x"},
        {"ppl:ptb": {"ppl": 35.0, "nll": 3.55, "windows": 16}, "arc_easy": mc(0.47)},
    )
    if second:
        _eval(
            store,
            run_id,
            5,
            "eval:8x+e",
            {"role": "recovered", "compression": "8x", "recovery": "e"},
            {"ppl:ptb": {"ppl": 25.0, "nll": 3.2, "windows": 16}, "arc_easy": mc(0.58)},
        )
    store.finish_run(run_id, "done")
    return store, run_id


def test_metric_helpers():
    assert matching(20.0, 20.9, metric="ppl") and not matching(20.0, 21.1, metric="ppl")
    assert matching(0.60, 0.58, metric="acc") and not matching(0.60, 0.56, metric="acc")
    assert gap_closed(20.0, 30.0, 25.0) == pytest.approx(0.5)
    assert gap_closed(0.6, 0.5, 0.55) == pytest.approx(0.5)  # higher-is-better works the same way
    assert f"{gap_closed(0.6, 0.5, 0.5):+.0%}" == "+0%"  # nothing won back prints as +0%, never -0%
    assert gap_closed(0.6, 0.6, 0.7) is None
    assert gap_closed(20.0, 20.1, 19.0, "ppl") is None  # a 0.5% "loss" is no gap to close
    assert gap_closed(20.0, 18.0, 17.0, "ppl") is None  # compressed better than dense: nothing lost
    assert gap_closed(0.6, 0.7, 0.65, "acc") is None
    assert gap_closed(20.0, 30.0, 18.0, "ppl") == pytest.approx(1.2)  # recovery beyond dense
    res = {
        "acc": 0.5,
        "acc_stderr": 0.1,
        "acc_norm": 0.6,
        "acc_norm_stderr": 0.2,
        "n": 10,
        "protocol": {"a": 1},
        "examples": [1, 2],
    }
    assert primary_metric("x", res) == "acc_norm"
    rows = {r["metric"]: r for r in metric_rows({"results": {"x": res}, "protocol": {"seqlen": 8}})}
    assert set(rows) == {"acc", "acc_norm"} and rows["acc"]["stderr"] == 0.1 and rows["acc_norm"]["n"] == 10
    assert rows["acc_norm"]["protocol"]["primary"] and rows["acc"]["protocol"]["a"] == 1
    assert "examples" not in rows["acc"]["protocol"]
    ppl = metric_rows({"results": {"ppl:ptb": {"ppl": 5.0, "nll": 1.6, "windows": 3, "tokens": 99}}})
    assert {r["metric"] for r in ppl} == {"ppl", "nll"} and all(r["n"] == 3 for r in ppl)


def test_report_tables_marks_and_gap(tmp_path):
    store, run_id = recovery_store(tmp_path / "s.sqlite")
    path, summary = write_report(store, run_id, tmp_path / "rep")
    md = path.read_text()
    assert "| 8x + p | recovered | 20.80 ✓ | 0.550 ± 0.020 ✗ |" in md
    assert "| 8x | compressed | 30.00 ✗ | 0.500 ± 0.020 ✗ |" in md
    assert "| s60 + p | transfer | 35.00 ✗ | 0.470 ± 0.020 ✗ |" in md
    # ppl gap (30-20.8)/(30-20) = 92%; arc (0.55-0.5)/(0.6-0.5) = 50%; transfer ppl (40-35)/(40-20) = 25%
    assert "| 92% | yes |" in md and "| 50% | no |" in md and "| 25% | no |" in md
    pngs = sorted(p.name for p in (tmp_path / "rep").glob("*.png"))
    assert pngs == ["gap_closed.png", "tasks.png"]
    assert all((tmp_path / "rep" / p).read_bytes()[:8] == PNG for p in pngs)
    assert "92% of the gap closed" in summary and "25% of the gap closed" in summary
    assert "30.00 (+50.0%)" in summary
    # every decimal in the summary is a stored value
    stored = {round(m["value"], 3) for m in store.metrics(run_id)}
    for x in re.findall(r"(?<![\w.])(\d+\.\d+)(?![\d%])", summary):
        assert round(float(x), 3) in stored, x
    store.close()


def test_summary_names_the_best_recovery_per_task(tmp_path):
    store, run_id = recovery_store(tmp_path / "s.sqlite", second=True)
    summary = summary_paragraph(load_view(store, run_id))
    # ppl: p closes (30-20.8)/10 = 92%, e 50%; arc: p 50%, e (0.58-0.5)/0.1 = 80%
    assert "Most of the gap closed on 8x, per task: ppl:ptb by p (92%); arc_easy by e (80%)." in summary
    single = summary_paragraph(load_view(*recovery_store(tmp_path / "t.sqlite")))
    assert "Most of the gap closed" not in single  # one recovery per compressed model: nothing to rank
    store.close()


def test_sweep_curve_plot(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    run_id = "sweep-1"
    store.start_run(run_id, "sweep", {"name": "sweep", "report": {"matching": 0.05}}, "sweep", "/x")
    _eval(store, run_id, 0, "eval:dense", {"role": "dense", "compression": "dense"}, {"ppl:ptb": {"ppl": 20.0}})
    pos = 1
    for method, slope in (("magnitude", 3.0), ("wanda", 1.0), ("sparsegpt", 0.5)):
        for s in (0.3, 0.5, 0.7):
            name = f"{method}-s{int(s * 100)}"
            _eval(
                store,
                run_id,
                pos,
                f"eval:{name}",
                {"role": "compressed", "compression": name, "method": method, "sparsity": s},
                {"ppl:ptb": {"ppl": 20.0 * (1 + slope * s**2)}},
            )
            pos += 1
    path, summary = write_report(store, run_id, tmp_path / "rep")
    assert (tmp_path / "rep" / "sweep.png").read_bytes()[:8] == PNG
    # 20*(1+0.5*0.09)=20.9 matches; 0.25*0.5 -> 22.5 does not
    assert "Highest sparsity still matching dense on ppl:ptb: magnitude none, wanda none, sparsegpt 30%." in summary
    assert "![sweep](sweep.png)" in path.read_text()
    view = load_view(store, run_id)
    assert summary_paragraph(view) == summary
    store.close()
