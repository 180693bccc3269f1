"""Real processes: SIGKILL in the middle of a stage, then `recoup run` again; two runs sharing one store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_run import EXPECTED_STAGES, tiny_recipe

from recoup.runs.store import Store


def recoup_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "recoup.cli", *args]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def kill_when_started(cmd: list[str], run_dir: Path, stage: str, delay: float, timeout: float = 300) -> None:
    """Start ``cmd``; once ``stage``'s partial directory exists (the stage is running), wait ``delay``, SIGKILL."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pattern = stage.replace(":", "_") + "-*.partial-*"
    deadline = time.time() + timeout
    try:
        while not list((run_dir / "stages").glob(pattern)):
            if proc.poll() is not None:
                pytest.fail(
                    f"the run ended (rc {proc.returncode}) before {stage} started: "
                    f"{proc.stderr.read().decode()[-2000:]}"
                )
            if time.time() > deadline:
                pytest.fail(f"{stage} did not start within {timeout}s")
            time.sleep(0.01)
        time.sleep(delay)
        assert proc.poll() is None, "the stage finished before the kill; make it longer"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("stage,delay", [("recover:prompt", 1.0), ("compress:s60", 0.0)])
def test_sigkill_mid_stage_then_resume(tmp_path, stage, delay):
    recipe = tiny_recipe(tmp_path, steps=6)
    if stage == "recover:prompt":  # make training long enough to be killed in the middle of it
        raw = yaml.safe_load(recipe.read_text())
        raw["recover"][0].update(steps=100000, time_budget=4.0, eval_every=50)
        recipe.write_text(yaml.safe_dump(raw))
    run_dir, store_path = tmp_path / "run", tmp_path / "store.sqlite"
    cmd = recoup_cmd("run", str(recipe), "--out", str(run_dir), "--store", str(store_path))
    kill_when_started(cmd, run_dir, stage, delay)

    before = EXPECTED_STAGES[: EXPECTED_STAGES.index(stage)]
    with Store(store_path) as store:
        run_id = store.runs()[0]["run_id"]
        assert store.runs()[0]["status"] == "running" and Store.effective_status(store.runs()[0]) == "interrupted"
        status = {s["stage"]: s["status"] for s in store.stages(run_id)}
        assert [s for s in EXPECTED_STAGES if status[s] == "done"] == before
        assert status[stage] == "running"
        finished = {s["stage"]: Path(s["dir"]) for s in store.stages(run_id) if s["status"] == "done"}
    mtimes = {name: (d / "result.json").stat().st_mtime_ns for name, d in finished.items()}
    assert list((run_dir / "stages").glob("*.partial-*")), "the killed stage left its partial directory"

    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "report:" in done.stdout and f"{len(EXPECTED_STAGES) - len(before)} stage(s) computed" in done.stdout

    assert not list((run_dir / "stages").glob("*.partial-*"))
    with Store(store_path) as store:
        stages = {s["stage"]: s for s in store.stages(run_id)}
        assert all(s["status"] == "done" for s in stages.values())
        assert stages[stage]["attempts"] == 2  # killed once, then finished
        for name in before:  # finished before the kill: never recomputed, reused once
            assert stages[name]["attempts"] == 1 and stages[name]["cache_hits"] == 1
            assert (finished[name] / "result.json").stat().st_mtime_ns == mtimes[name]
        rows = store.metrics(run_id)
        keys = [(r["stage"], r["task"], r["metric"]) for r in rows]
        assert len(keys) == len(set(keys))
        evals = [s for s in EXPECTED_STAGES if s.startswith("eval:")]
        assert {r["stage"] for r in rows if r["metric"] == "ppl"} == set(evals)
        assert store.run(run_id)["status"] == "done"


def test_two_runs_share_one_store(tmp_path):
    store_path = tmp_path / "store.sqlite"
    procs = []
    for name, seed in (("alpha", 0), ("beta", 1)):
        recipe = tiny_recipe(tmp_path, name=name, seed=seed)
        cmd = recoup_cmd("run", str(recipe), "--out", str(tmp_path / name), "--store", str(store_path), "--no-report")
        procs.append(subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    with Store(store_path) as store:
        runs = {r["name"]: r for r in store.runs()}
        assert set(runs) == {"alpha", "beta"}
        for r in runs.values():
            assert r["status"] == "done"
            stages = store.stages(r["run_id"])
            assert [s["stage"] for s in stages] == EXPECTED_STAGES and all(s["status"] == "done" for s in stages)
            assert {m["stage"] for m in store.metrics(r["run_id"]) if m["metric"] == "ppl"} == {
                s for s in EXPECTED_STAGES if s.startswith("eval:")
            }


def test_a_weight_or_code_change_changes_the_stage_keys(tmp_path):
    """What invalidates the cache: the model's weights (its fingerprint) and the code a stage runs."""
    from helpers import save_tiny
    from test_run import tiny_recipe

    from recoup.recipe import load_recipe
    from recoup.runs import cache
    from recoup.runs.plan import build_plan
    from recoup.runs.run import stage_keys

    recipe = load_recipe(tiny_recipe(tmp_path))
    before = stage_keys(build_plan(recipe, cache.source_fingerprint(recipe.model)))
    save_tiny(tmp_path / "model", "llama", hidden=32, layers=2, seed=1)  # same config, other weights
    after = stage_keys(build_plan(recipe, cache.source_fingerprint(recipe.model)))
    assert set(before) == set(after) and all(before[k] != after[k] for k in before)

    root = tmp_path / "pkg"
    (root / "compress").mkdir(parents=True)
    (root / "compress" / "engine.py").write_text("x = 1\n")
    v1 = cache.code_version(("compress",), root)
    (root / "compress" / "engine.py").write_text("x = 2\n")
    cache.code_version.cache_clear()
    assert cache.code_version(("compress",), root) != v1
    assert cache.stage_key("compress", {"a": 1}, {}, v1) != cache.stage_key(
        "compress", {"a": 1}, {}, cache.code_version(("compress",), root)
    )
