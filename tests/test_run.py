"""`recoup run` end to end on a tiny model: stages, caching, the store, the report, the summary."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import yaml
from helpers import save_tiny

from recoup.recipe import load_recipe
from recoup.runs.run import run_recipe
from recoup.runs.store import Store

WORDS = (
    "the market rose as traders bought shares of the company while bonds fell and the bank said its "
    "profit would grow next year because demand for loans was strong in the new quarter"
).split()


def write_corpus(path: Path, n_words: int = 6000, seed: int = 0) -> Path:
    rng = random.Random(seed)
    sentences, words = [], 0
    while words < n_words:
        k = rng.randint(5, 14)
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(k)) + " .")
        words += k
    path.write_text("\n".join(sentences))
    return path


def tiny_recipe(tmp: Path, steps: int = 6, name: str = "tiny", seed: int = 0) -> Path:
    """A recipe file in ``tmp`` naming a saved tiny llama and a local text corpus (made once per directory)."""
    model, corpus = tmp / "model", tmp / "corpus.txt"
    if not model.exists():
        save_tiny(model, "llama", hidden=32, layers=2)
        write_corpus(corpus)
    recipe = {
        "name": name,
        "model": str(model),
        "seed": seed,
        "calibration": {"corpus": str(corpus), "nsamples": 4, "seqlen": 32},
        "evaluate": {"tasks": [f"ppl:{corpus}"], "limit": 2, "seqlen": 48},
        "compress": [
            {"name": "8x", "method": "sparsegpt", "sparsity": 0.5, "bits": 4, "group_size": 16},
            {"name": "s60", "method": "sparsegpt", "sparsity": 0.6},
        ],
        "recover": [
            {
                "name": "prompt",
                "method": "soft-prompt",
                "base": "8x",
                "transfer": ["s60"],
                "tokens": 4,
                "data": str(corpus),
                "seqlen": 32,
                "batch_size": 2,
                "steps": steps,
                "lr": 0.05,
                "eval_every": max(1, steps // 2),
                "val_windows": 2,
            }
        ],
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


EXPECTED_STAGES = [
    "eval:dense",
    "compress:8x",
    "eval:8x",
    "recover:prompt",
    "eval:8x+prompt",
    "compress:s60",
    "eval:s60",
    "eval:s60+prompt",
]


def test_full_tiny_run_then_rerun_reuses_everything(tmp_path):
    recipe = load_recipe(tiny_recipe(tmp_path))
    with Store(tmp_path / "store.sqlite") as store:
        first = run_recipe(recipe, tmp_path / "run", store)
        assert first.ran == EXPECTED_STAGES and first.cached == []
        stages = {s["stage"]: s for s in store.stages(first.run_id)}
        assert list(stages) == EXPECTED_STAGES
        assert all(s["status"] == "done" and s["attempts"] == 1 for s in stages.values())
        rows = store.metrics(first.run_id)
        ppl = {r["stage"]: r["value"] for r in rows if r["metric"] == "ppl"}
        assert set(ppl) == {s for s in EXPECTED_STAGES if s.startswith("eval:")}
        assert all(r["n"] == 2 for r in rows if r["metric"] == "ppl")  # 2 windows each
        # the artifacts exist where the store says
        arts = {a["stage"]: Path(a["path"]) for a in store.artifacts(first.run_id)}
        assert (arts["compress:8x"] / "recoup.json").is_file()
        assert (arts["recover:prompt"] / "adapter_model.safetensors").is_file()
        # report: markdown with the tables, at least two PNG plots
        report = first.report_path.read_text()
        assert "| 8x + prompt | recovered |" in report and "gap closed" in report
        pngs = list(first.report_path.parent.glob("*.png"))
        assert len(pngs) >= 2 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
        # the summary's numbers are the store's numbers: every decimal in it is a stored headline value
        for stage in ("eval:dense", "eval:8x", "eval:8x+prompt", "eval:s60", "eval:s60+prompt"):
            assert f"{ppl[stage]:.2f}" in first.summary
        primary = {round(r["value"], 2) for r in rows if r["protocol"].get("primary")}
        numbers = [float(x) for x in re.findall(r"(?<![\w.])(\d+\.\d+)(?![\d%])", first.summary)]
        assert numbers and all(round(x, 2) in primary for x in numbers), (numbers, primary)
        assert store.run(first.run_id)["summary"] == first.summary

        n_rows = len(rows)
        second = run_recipe(recipe, tmp_path / "run", store)
        assert second.run_id == first.run_id and second.ran == [] and second.cached == EXPECTED_STAGES
        assert len(store.metrics(first.run_id)) == n_rows
        assert all(s["attempts"] == 1 and s["cache_hits"] == 1 for s in store.stages(first.run_id))
        assert store.run(first.run_id)["status"] == "done"


def test_changing_one_step_recomputes_only_what_depends_on_it(tmp_path):
    path = tiny_recipe(tmp_path)
    with Store(tmp_path / "store.sqlite") as store:
        run_recipe(load_recipe(path), tmp_path / "run", store, report=False)
        changed = run_recipe(load_recipe(path, ["recover.prompt.steps=5"]), tmp_path / "run", store, report=False)
        assert changed.ran == ["recover:prompt", "eval:8x+prompt", "eval:s60+prompt"]
        assert set(changed.cached) == set(EXPECTED_STAGES) - set(changed.ran)
        changed = run_recipe(load_recipe(path, ["compress.s60.sparsity=0.7"]), tmp_path / "run", store, report=False)
        assert changed.ran == ["compress:s60", "eval:s60", "eval:s60+prompt"]
        assert len(store.runs()) == 3  # three recipes, three runs, one cache


def test_a_failing_stage_is_recorded_and_finished_stages_are_kept(tmp_path):
    path = tiny_recipe(tmp_path)
    recipe = load_recipe(path)
    (tmp_path / "corpus.txt").unlink()  # the calibration / evaluation corpus disappears after validation
    from recoup.errors import RecoupError

    with Store(tmp_path / "store.sqlite") as store:
        with pytest.raises(RecoupError, match="not found"):
            run_recipe(recipe, tmp_path / "run", store)
        runs = store.runs()
        assert runs[0]["status"] == "failed"
        failed = [s for s in store.stages(runs[0]["run_id"]) if s["status"] == "failed"]
        assert len(failed) == 1 and "not found" in failed[0]["error"]
