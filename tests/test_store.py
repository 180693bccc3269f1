"""The SQLite results store: idempotent upserts, lookups, and two processes writing at once."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3

import pytest

from recoup.errors import RecoupError
from recoup.runs.store import Store


def _fill(store: Store, run_id: str, stages: int, tasks: int) -> None:
    store.start_run(run_id, run_id.split("-")[0], {"name": run_id}, "r.yaml", f"/tmp/{run_id}")
    for s in range(stages):
        store.plan_stage(run_id, f"eval:{s}", s, "evaluate", f"key{s}", f"/tmp/{run_id}/{s}", {"role": "compressed"})
        store.stage_started(run_id, f"eval:{s}")
        metrics = [
            {"task": f"t{t}", "metric": "acc", "value": t / 10, "n": 100, "stderr": 0.01, "protocol": {"primary": True}}
            for t in range(tasks)
        ]
        store.stage_finished(run_id, f"eval:{s}", {"ok": s}, False, 1.5, metrics, {"result": f"/tmp/{s}.json"})
    store.finish_run(run_id, "done", summary=f"summary of {run_id}")


def _writer(path: str, run_id: str, stages: int, tasks: int) -> None:
    with Store(path, timeout_s=60) as store:
        _fill(store, run_id, stages, tasks)


def test_rows_and_idempotent_upserts(tmp_path):
    with Store(tmp_path / "s.sqlite") as store:
        _fill(store, "a-1", 3, 4)
        assert len(store.metrics("a-1")) == 12
        # recording the same stage again (e.g. a resumed run reusing it) never duplicates rows
        store.stage_finished(
            "a-1",
            "eval:0",
            {"ok": 0},
            True,
            0.0,
            [{"task": "t0", "metric": "acc", "value": 0.0, "n": 100, "stderr": 0.01}],
            {},
        )
        assert len(store.metrics("a-1")) == 12
        st = {s["stage"]: s for s in store.stages("a-1")}
        assert st["eval:0"]["cache_hits"] == 1 and st["eval:0"]["attempts"] == 1 and st["eval:0"]["seconds"] == 1.5
        assert store.run("a-1")["summary"] == "summary of a-1"
        assert store.run("a")["run_id"] == "a-1"  # by name
        assert store.run("a-")["run_id"] == "a-1"  # by prefix
        with pytest.raises(RecoupError, match="no run 'zzz'"):
            store.run("zzz")


def test_replanning_a_stage_with_a_new_key_drops_its_old_rows(tmp_path):
    with Store(tmp_path / "s.sqlite") as store:
        _fill(store, "a-1", 1, 2)
        store.plan_stage("a-1", "eval:0", 0, "evaluate", "key0", "/x", {})  # same key: kept
        assert len(store.metrics("a-1")) == 2 and store.stages("a-1")[0]["status"] == "done"
        store.plan_stage("a-1", "eval:0", 0, "evaluate", "other", "/x", {})  # new key: pending, rows gone
        assert store.metrics("a-1") == [] and store.stages("a-1")[0]["status"] == "pending"


def test_wal_mode_and_busy_timeout(tmp_path):
    with Store(tmp_path / "s.sqlite", timeout_s=12) as store:
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 12000


def test_two_processes_write_at_once(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    Store(path).close()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, f"{name}-x", 40, 5)) for name in ("first", "second")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with Store(path) as store:
        assert {r["run_id"] for r in store.runs()} == {"first-x", "second-x"}
        for run_id in ("first-x", "second-x"):
            assert len(store.stages(run_id)) == 40
            assert all(s["status"] == "done" for s in store.stages(run_id))
            assert len(store.metrics(run_id)) == 200
            assert store.run(run_id)["status"] == "done"


def test_a_foreign_file_is_one_clear_line(tmp_path):
    f = tmp_path / "not.sqlite"
    f.write_bytes(b"this is not a database" * 100)
    with pytest.raises(RecoupError, match="not a usable results store"):
        Store(f)


def test_transaction_rolls_back_on_error(tmp_path):
    with Store(tmp_path / "s.sqlite") as store:
        with pytest.raises(sqlite3.IntegrityError):
            with store.transaction() as c:
                c.execute(
                    "INSERT INTO runs (run_id, name, recipe, run_dir, status, created, updated) "
                    "VALUES ('x', 'x', '{}', '/', 'done', 0, 0)"
                )
                c.execute(
                    "INSERT INTO runs (run_id, name, recipe, run_dir, status, created, updated) "
                    "VALUES ('x', 'x', '{}', '/', 'done', 0, 0)"
                )
        assert store.runs() == []
