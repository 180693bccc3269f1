"""The results store: one SQLite file (no server) holding runs, stages, artifacts and metrics.

Tables: ``runs`` (one row per run), ``stages`` (per run and stage: key, status, attempts, cache
hits, result), ``artifacts`` (files a stage produced) and ``metrics`` (one row per
run/stage/task/metric with value, n, stderr and the protocol). Several processes may write at
once: WAL journal, a busy timeout, and every write in one ``BEGIN IMMEDIATE`` transaction; rows
are upserts keyed by their natural primary keys, so recording a result twice never duplicates it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator

from recoup.errors import RecoupError
from recoup.paths import recoup_home
from recoup.safeio import dumps, redact

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
  run_id TEXT PRIMARY KEY, name TEXT NOT NULL, recipe_source TEXT, recipe TEXT NOT NULL, run_dir TEXT NOT NULL,
  status TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL, finished REAL, host TEXT, pid INTEGER,
  summary TEXT, report TEXT);
CREATE TABLE IF NOT EXISTS stages (
  run_id TEXT NOT NULL, stage TEXT NOT NULL, position INTEGER NOT NULL, kind TEXT NOT NULL, key TEXT NOT NULL,
  status TEXT NOT NULL, dir TEXT, labels TEXT, result TEXT, error TEXT, started REAL, finished REAL, seconds REAL,
  attempts INTEGER NOT NULL DEFAULT 0, cache_hits INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (run_id, stage));
CREATE TABLE IF NOT EXISTS artifacts (
  run_id TEXT NOT NULL, stage TEXT NOT NULL, kind TEXT NOT NULL, path TEXT NOT NULL, key TEXT NOT NULL,
  PRIMARY KEY (run_id, stage, kind));
CREATE TABLE IF NOT EXISTS metrics (
  run_id TEXT NOT NULL, stage TEXT NOT NULL, task TEXT NOT NULL, metric TEXT NOT NULL, value REAL,
  n INTEGER, stderr REAL, protocol TEXT, PRIMARY KEY (run_id, stage, task, metric));
"""


def default_store_path() -> Path:
    """``$RECOUP_STORE`` or ``$RECOUP_HOME/results.sqlite``."""
    env = os.environ.get("RECOUP_STORE")
    return Path(env).expanduser() if env else recoup_home() / "results.sqlite"


class Store:
    """A connection to the results store; safe to use from several processes at once."""

    def __init__(self, path: str | Path | None = None, timeout_s: float = 60.0) -> None:
        self.path = Path(path).expanduser() if path else default_store_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(str(self.path), timeout=timeout_s, isolation_level=None)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = NORMAL")
            with self.transaction() as c:
                for stmt in SCHEMA.strip().split(";"):
                    if stmt.strip():
                        c.execute(stmt)
        except sqlite3.DatabaseError as exc:
            raise RecoupError(f"'{self.path}' is not a usable results store ({exc})") from None

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken immediately (the busy timeout waits out other writers)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # ------------------------------------------------------------------ writes

    def start_run(self, run_id: str, name: str, recipe: dict, source: str, run_dir: str) -> None:
        now = time.time()
        with self.transaction() as c:
            c.execute(
                """INSERT INTO runs (run_id, name, recipe_source, recipe, run_dir, status, created, updated, host, pid)
                         VALUES (?, ?, ?, ?, ?, 'running', ?, ?, ?, ?)
                         ON CONFLICT(run_id) DO UPDATE SET status='running', updated=excluded.updated,
                         host=excluded.host, pid=excluded.pid, finished=NULL""",
                (
                    run_id,
                    name,
                    source,
                    dumps(recipe, sort_keys=True),
                    run_dir,
                    now,
                    now,
                    socket.gethostname(),
                    os.getpid(),
                ),
            )

    def plan_stage(
        self, run_id: str, stage: str, position: int, kind: str, key: str, out_dir: str, labels: dict
    ) -> None:
        """Register a stage as pending (keeps counters of earlier attempts when the key is unchanged)."""
        with self.transaction() as c:
            row = c.execute("SELECT key, status FROM stages WHERE run_id=? AND stage=?", (run_id, stage)).fetchone()
            if row is None or row["key"] != key:
                c.execute(
                    """INSERT OR REPLACE INTO stages (run_id, stage, position, kind, key, status, dir, labels)
                             VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)""",
                    (run_id, stage, position, kind, key, out_dir, dumps(labels)),
                )
                c.execute("DELETE FROM metrics WHERE run_id=? AND stage=?", (run_id, stage))
                c.execute("DELETE FROM artifacts WHERE run_id=? AND stage=?", (run_id, stage))
            else:
                c.execute(
                    "UPDATE stages SET position=?, labels=? WHERE run_id=? AND stage=?",
                    (position, dumps(labels), run_id, stage),
                )

    def stage_started(self, run_id: str, stage: str) -> None:
        with self.transaction() as c:
            c.execute(
                """UPDATE stages SET status='running', started=?, attempts=attempts+1, error=NULL
                         WHERE run_id=? AND stage=?""",
                (time.time(), run_id, stage),
            )

    def stage_failed(self, run_id: str, stage: str, error: str) -> None:
        with self.transaction() as c:
            c.execute(
                "UPDATE stages SET status='failed', error=? WHERE run_id=? AND stage=?", (redact(error), run_id, stage)
            )

    def stage_finished(
        self,
        run_id: str,
        stage: str,
        result: dict,
        cached: bool,
        seconds: float,
        metrics: list[dict],
        artifacts: dict[str, str],
    ) -> None:
        """Record a finished stage, its metrics and artifacts in one transaction (idempotent)."""
        with self.transaction() as c:
            c.execute(
                """UPDATE stages SET status='done', result=?, finished=COALESCE(finished, ?),
                         seconds=COALESCE(?, seconds), cache_hits=cache_hits+? WHERE run_id=? AND stage=?""",
                (dumps(result, default=str), time.time(), None if cached else seconds, int(cached), run_id, stage),
            )
            key = c.execute("SELECT key FROM stages WHERE run_id=? AND stage=?", (run_id, stage)).fetchone()["key"]
            for kind, path in artifacts.items():
                c.execute("INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?, ?, ?)", (run_id, stage, kind, path, key))
            for m in metrics:
                c.execute(
                    "INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        run_id,
                        stage,
                        m["task"],
                        m["metric"],
                        m["value"],
                        m.get("n"),
                        m.get("stderr"),
                        dumps(m.get("protocol") or {}, sort_keys=True, default=str),
                    ),
                )

    def interrupt_run(self, run_id: str) -> None:
        """Mark the run and every stage of it still running as interrupted (SIGINT/SIGTERM)."""
        with self.transaction() as c:
            c.execute("UPDATE stages SET status='interrupted' WHERE run_id=? AND status='running'", (run_id,))
            c.execute(
                "UPDATE runs SET status='interrupted', updated=?, finished=NULL WHERE run_id=?", (time.time(), run_id)
            )

    def finish_run(self, run_id: str, status: str, summary: str | None = None, report: str | None = None) -> None:
        with self.transaction() as c:
            c.execute(
                """UPDATE runs SET status=?, updated=?, finished=?, summary=COALESCE(?, summary),
                         report=COALESCE(?, report) WHERE run_id=?""",
                (status, time.time(), time.time() if status == "done" else None, summary, report, run_id),
            )

    # ------------------------------------------------------------------ reads

    @staticmethod
    def effective_status(run: dict) -> str:
        """The run's status, with 'running' shown as 'interrupted' when its process on this host is gone."""
        if run["status"] != "running" or run.get("host") != socket.gethostname() or not run.get("pid"):
            return run["status"]
        try:
            os.kill(int(run["pid"]), 0)
        except ProcessLookupError:
            return "interrupted"
        except PermissionError:
            pass
        return "running"

    def runs(self) -> list[dict]:
        rows = self.conn.execute("SELECT * FROM runs ORDER BY created").fetchall()
        return [dict(r) for r in rows]

    def run(self, run_id: str) -> dict:
        """One run by id, or by a unique prefix of its id or by its name (the latest run of that name)."""
        row = self.conn.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
        if row is None:
            rows = self.conn.execute(
                "SELECT * FROM runs WHERE run_id LIKE ? ORDER BY created", (run_id.replace("%", "") + "%",)
            ).fetchall()
            if len(rows) > 1:
                raise RecoupError(
                    f"'{run_id}' matches {len(rows)} runs: {', '.join(r['run_id'] for r in rows)}; give more of the id"
                )
            row = rows[0] if rows else None
        if row is None:
            rows = self.conn.execute("SELECT * FROM runs WHERE name=? ORDER BY created DESC", (run_id,)).fetchall()
            row = rows[0] if rows else None
        if row is None:
            known = [r["run_id"] for r in self.conn.execute("SELECT run_id FROM runs ORDER BY created")]
            raise RecoupError(
                f"no run '{run_id}' in {self.path}; known: {', '.join(known) or '(none)'} (`recoup runs` lists them)"
            )
        return dict(row)

    def stages(self, run_id: str) -> list[dict]:
        rows = self.conn.execute("SELECT * FROM stages WHERE run_id=? ORDER BY position", (run_id,)).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["labels"] = json.loads(d["labels"] or "{}")
            d["result"] = json.loads(d["result"]) if d["result"] else None
            out.append(d)
        return out

    def metrics(self, run_id: str) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            """SELECT m.*, s.position FROM metrics m JOIN stages s
                                    ON s.run_id=m.run_id AND s.stage=m.stage WHERE m.run_id=?
                                    ORDER BY s.position, m.task, m.metric""",
            (run_id,),
        ).fetchall()
        return [{**dict(r), "protocol": json.loads(r["protocol"] or "{}")} for r in rows]

    def artifacts(self, run_id: str) -> list[dict]:
        return [dict(r) for r in self.conn.execute("SELECT * FROM artifacts WHERE run_id=? ORDER BY stage", (run_id,))]
