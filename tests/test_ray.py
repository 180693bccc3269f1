"""The Ray executor on a local cluster: same store rows as the local executor; a killed worker is retried or stops
cleanly.

Stages run in Ray worker processes that import recoup afresh: only importable code exists there (a toy method
registered inside a test would not), so these tests use built-in methods.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from test_run_sweep import sweep_recipe  # noqa: E402

from recoup.cli import main  # noqa: E402
from recoup.errors import RecoupError  # noqa: E402
from recoup.recipe import load_recipe  # noqa: E402
from recoup.runs.cache import safe_name  # noqa: E402
from recoup.runs.ray_executor import RayExecutor  # noqa: E402
from recoup.runs.run import run_recipe  # noqa: E402
from recoup.runs.store import Store  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module (starting one takes seconds); executors join it."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=80 * 2**20,
        configure_logging=False,
        runtime_env={"env_vars": {"PYTHONPATH": src, "OMP_NUM_THREADS": "1"}},
    )
    yield
    ray.shutdown()


def values(store: Store, run_id: str) -> dict:
    """Every metric row except compression wall time/memory (which differ between any two runs)."""
    return {
        (m["stage"], m["task"], m["metric"]): m["value"]
        for m in store.metrics(run_id)
        if m["task"] != "compress" or m["metric"] in ("sparsity", "mean_error")
    }


def stage_workers() -> dict[int, str]:
    """pid -> title of the Ray worker processes now running a recoup stage (their title is ``ray::recoup:NAME``)."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::recoup:"):
            found[int(pid)] = title
    return found


def kill_one_stage_after_a_finished_one(run_dir: Path, stop: threading.Event) -> list[str]:
    """Wait until some stage finished, then SIGKILL the worker of a stage that is running; return its title."""
    killed: list[str] = []
    while not stop.is_set() and not killed:
        finished = [
            d for d in (run_dir / "stages").glob("*") if ".partial-" not in d.name and (d / "result.json").is_file()
        ]
        workers = stage_workers() if finished else {}
        if workers:
            pid, title = next(iter(workers.items()))
            os.kill(pid, signal.SIGKILL)
            killed.append(title)
        time.sleep(0.02)
    return killed


def run_with_a_kill(recipe, run_dir: Path, store: Store, executor: RayExecutor):
    stop, box = threading.Event(), {}
    killer = threading.Thread(target=lambda: box.update(killed=kill_one_stage_after_a_finished_one(run_dir, stop)))
    killer.start()
    try:
        return run_recipe(recipe, run_dir, store, executor=executor, report=False)
    finally:
        stop.set()
        killer.join()
        assert box.get("killed"), "no running stage was found to kill"


def test_cli_sweep_on_ray_gives_the_local_store_rows(cluster, tmp_path, capsys):
    store_path, recipe = str(tmp_path / "store.sqlite"), sweep_recipe(tmp_path)
    args = [
        "sweep",
        str(recipe),
        "--methods",
        "magnitude,wanda",
        "--sparsity",
        "0.5",
        "--store",
        store_path,
        "--no-report",
    ]
    assert main(args + ["--out", str(tmp_path / "ray"), "--executor", "ray"]) == 0
    assert "5 stage(s) computed, 0 reused" in capsys.readouterr().out
    assert main(args + ["--out", str(tmp_path / "local")]) == 0
    with Store(store_path) as store:
        runs = {Path(r["run_dir"]).name: r["run_id"] for r in store.runs()}
        ray_rows, local_rows = values(store, runs["ray"]), values(store, runs["local"])
    assert len(ray_rows) >= 8 and ray_rows == local_rows
    # a finished stage is never recomputed, whichever executor computed it
    assert main(args + ["--out", str(tmp_path / "ray")]) == 0
    assert "0 stage(s) computed, 5 reused" in capsys.readouterr().out
    assert main(args + ["--out", str(tmp_path / "local"), "--executor", "local", "--address", "x:1"]) == 2
    assert "--address is for a cluster executor" in capsys.readouterr().err


def test_a_killed_worker_is_retried_and_the_run_matches_local(cluster, tmp_path):
    recipe = load_recipe(sweep_recipe(tmp_path), ["sweep.methods=[wanda]"])
    with Store(tmp_path / "store.sqlite") as store:
        retried = run_with_a_kill(recipe, tmp_path / "ray", store, RayExecutor(max_retries=2))
        local = run_recipe(recipe, tmp_path / "local", store, report=False)
        # every stage ran or (killed just after its result was written, so its retry found it) was reused
        assert sorted(retried.ran + retried.cached) == sorted(local.ran)
        assert values(store, retried.run_id) == values(store, local.run_id)
    assert not list((tmp_path / "ray" / "stages").glob("*.partial-*"))  # the killed attempt's leftovers are gone


def test_a_killed_worker_without_retries_stops_naming_the_stage_and_keeps_finished_ones(cluster, tmp_path):
    recipe = load_recipe(sweep_recipe(tmp_path), ["sweep.methods=[wanda]"])
    with Store(tmp_path / "store.sqlite") as store:
        with pytest.raises(RecoupError) as err:
            run_with_a_kill(recipe, tmp_path / "ray", store, RayExecutor(max_retries=0))
        msg = str(err.value)
        assert "\n" not in msg and "Ray worker died 1 time(s)" in msg and "finished stages are kept" in msg
        run_id = store.runs()[0]["run_id"]
        stages = {s["stage"]: s["status"] for s in store.stages(run_id)}
        failed = [name for name, status in stages.items() if status == "failed"]
        assert len(failed) == 1 and msg.startswith(f"stage {failed[0]}:")
        recorded = {name for name, status in stages.items() if status == "done"}
        on_disk = {
            d.name.rsplit("-", 1)[0]
            for d in (tmp_path / "ray" / "stages").glob("*")
            if ".partial-" not in d.name and (d / "result.json").is_file()
        }
        assert on_disk and {safe_name(n) for n in recorded} <= on_disk
        resumed = run_recipe(recipe, tmp_path / "ray", store, report=False)  # locally: nothing finished is redone
        assert {safe_name(n) for n in resumed.cached} >= on_disk and len(resumed.ran) + len(resumed.cached) == 5
