"""Sweeps on a tiny model, the executor interface (jobs run in other processes), and the run CLI commands."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
from pathlib import Path

import yaml
from test_run import tiny_recipe

from recoup.cli import main
from recoup.recipe import load_recipe
from recoup.runs.executor import Executor, Job, JobFailed, JobResult, run_job
from recoup.runs.run import run_recipe
from recoup.runs.store import Store


class PoolExecutor(Executor):
    """Jobs in worker processes, handed back as they complete: the shape a Ray/Dask engine takes."""

    def __init__(self, workers: int = 2) -> None:
        self.pool = cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
        self.pending: dict[cf.Future, Job] = {}

    def submit(self, job: Job) -> None:
        self.pending[self.pool.submit(run_job, job)] = job

    def next_done(self) -> tuple[Job, JobResult]:
        done, _ = cf.wait(list(self.pending), return_when=cf.FIRST_COMPLETED)
        fut = next(iter(done))
        job = self.pending.pop(fut)
        try:
            return job, fut.result()
        except Exception as exc:
            raise JobFailed(job, exc) from exc

    def pending_count(self) -> int:
        return len(self.pending)

    def close(self) -> None:
        self.pool.shutdown()


def sweep_recipe(tmp: Path) -> Path:
    raw = yaml.safe_load(tiny_recipe(tmp).read_text())
    raw.update(
        name="tinysweep",
        compress=[],
        recover=[],
        sweep={"methods": ["magnitude", "wanda"], "sparsity": [0.3, 0.6], "bits": [None]},
        evaluate={"tasks": raw["evaluate"]["tasks"], "limit": 1, "seqlen": 48},
    )
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_sweep_in_worker_processes_equals_local_and_plots_the_curve(tmp_path):
    recipe = load_recipe(sweep_recipe(tmp_path), ["sweep.methods=[wanda]"])
    cells = ["wanda-s30", "wanda-s60"]
    assert [c["name"] for c in recipe.compress_steps()] == cells
    with Store(tmp_path / "store.sqlite") as store:
        pooled = run_recipe(recipe, tmp_path / "pooled", store, executor=PoolExecutor())
        local = run_recipe(recipe, tmp_path / "local", store)
        assert sorted(pooled.ran) == sorted(local.ran) and len(local.ran) == 1 + 2 * len(cells)

        def values(run_id):
            return {
                (m["stage"], m["task"], m["metric"]): m["value"]
                for m in store.metrics(run_id)
                if m["task"] != "compress"
            }

        assert values(pooled.run_id) == values(local.run_id)  # where a job runs does not change its result
        sparsity = {m["stage"]: m["value"] for m in store.metrics(local.run_id) if m["metric"] == "sparsity"}
        # per-row rounding on 32-wide rows: within a few percent of the asked level
        assert abs(sparsity["compress:wanda-s60"] - 0.6) < 0.03 and abs(sparsity["compress:wanda-s30"] - 0.3) < 0.03
    assert (local.report_path.parent / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "Highest sparsity still matching dense" in local.summary


def test_cli_sweep_runs_show_report(tmp_path, capsys):
    store = str(tmp_path / "store.sqlite")
    recipe = sweep_recipe(tmp_path)
    rc = main(
        [
            "sweep",
            str(recipe),
            "--methods",
            "magnitude",
            "--sparsity",
            "0.2,0.4",
            "--out",
            str(tmp_path / "run"),
            "--store",
            store,
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "5 stage(s) computed, 0 reused" in out and "report:" in out
    assert main(["runs", "--store", store]) == 0
    listing = capsys.readouterr().out
    assert "tinysweep" in listing and "done" in listing and "5/5" in listing
    assert main(["show", "tinysweep", "--store", store]) == 0
    shown = capsys.readouterr().out
    assert "eval:magnitude-s40" in shown and "ppl" in shown
    assert main(["report", "--all", "--out", str(tmp_path / "reports"), "--store", store]) == 0
    assert len(list((tmp_path / "reports").glob("*/report.md"))) == 1
    assert main(["show", "nope", "--store", store]) == 2
    assert "no run 'nope'" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.yaml"), "--store", store]) == 2
    assert "recipe file not found" in capsys.readouterr().err
