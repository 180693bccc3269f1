"""Run a recipe: plan the stages, reuse finished ones, run the rest through an executor, record, report.

The driver is the only writer of the results store. Each stage result is recorded as soon as it
arrives, in one transaction, so a run killed at any point keeps every finished stage (its output
directory is complete on disk, its rows are in the store) and the next ``recoup run`` of the same
recipe into the same directory picks up from there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from recoup.errors import RecoupError
from recoup.recipe import Recipe
from recoup.recipe.jobs import writable
from recoup.runs import cache
from recoup.runs.executor import Executor, Job, JobFailed, JobResult, LocalExecutor
from recoup.runs.metrics import metric_rows
from recoup.runs.plan import StageSpec, build_plan
from recoup.runs.stages import ARTIFACT_DIR, EXPORT_DIR, RECOVERY_DIR, STAGE_CODE
from recoup.runs.store import Store
from recoup.safeio import dumps

log = logging.getLogger(__name__)

LOCK_FILE = ".recoup.lock"


@dataclasses.dataclass
class RunOutcome:
    run_id: str
    run_dir: Path
    store_path: Path
    report_path: Path | None
    summary: str
    ran: list[str]  # stages computed in this invocation
    cached: list[str]  # stages reused from earlier invocations
    seconds: float


def default_run_dir(recipe: Recipe) -> Path:
    return Path("runs") / cache.safe_name(recipe.name)


def make_run_id(recipe: Recipe, run_dir: Path) -> str:
    """Stable per (recipe content, run directory): running the same again resumes the same run."""
    digest = hashlib.sha256(f"{recipe.digest()}|{Path(run_dir).resolve()}".encode()).hexdigest()
    return f"{cache.safe_name(recipe.name)}-{digest[:8]}"


def stage_keys(plan: list[StageSpec]) -> dict[str, str]:
    keys: dict[str, str] = {}
    for spec in plan:
        needs = {n: keys[n] for n in spec.needs}
        keys[spec.name] = cache.stage_key(spec.kind, spec.params, needs, cache.code_version(STAGE_CODE[spec.kind]))
    return keys


def _metrics_of(spec: StageSpec, result: dict) -> list[dict]:
    if spec.kind == "evaluate":
        return metric_rows(result.get("evaluation") or {})
    if spec.kind == "recover":
        train = result.get("train") or {}
        rows = []
        for metric, value in (
            ("best_val_loss", train.get("best_val_loss")),
            ("val_loss_without", result.get("val_loss_without_recovery")),
            ("steps", train.get("steps")),
            ("seconds", train.get("seconds")),
            ("tokens", train.get("tokens")),
        ):
            if isinstance(value, (int, float)):
                rows.append(
                    {
                        "task": "train",
                        "metric": metric,
                        "value": float(value),
                        "n": None,
                        "stderr": None,
                        "protocol": {"config": result.get("config")},
                    }
                )
        return rows
    if spec.kind == "compress":
        rep = result.get("report") or {}
        values = {
            "seconds": result.get("compress_seconds"),
            "sparsity": rep.get("sparsity"),
            "mean_error": rep.get("mean_error"),
            "peak_rss_mb": rep.get("peak_rss_mb"),
        }
        return [
            {
                "task": "compress",
                "metric": k,
                "value": float(v),
                "n": None,
                "stderr": None,
                "protocol": {"calibration": result.get("calibration"), "config": rep.get("config")},
            }
            for k, v in values.items()
            if isinstance(v, (int, float))
        ]
    return []


def _artifacts_of(spec: StageSpec, out_dir: str) -> dict[str, str]:
    if spec.kind == "compress":
        return {"artifact": str(Path(out_dir) / ARTIFACT_DIR)}
    if spec.kind == "recover":
        return {"recovery": str(Path(out_dir) / RECOVERY_DIR)}
    if spec.kind == "export":
        return {"export": str(Path(out_dir) / EXPORT_DIR)}
    return {"result": str(Path(out_dir) / cache.RESULT)}


RUN_FILES = ("run.json", "stages", "report", LOCK_FILE)  # everything recoup writes into a run directory


def check_run_dir(run_dir: Path) -> None:
    """A run directory is new, empty, or one recoup wrote (it holds only :data:`RUN_FILES`); its parent
    is writable. One line otherwise, before anything runs."""
    if run_dir.exists():
        if not run_dir.is_dir():
            raise RecoupError(f"--out '{run_dir}' exists and is a file; choose a directory path")
        foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_FILES)
        if foreign:
            raise RecoupError(
                f"--out '{run_dir}' holds files recoup did not write ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty directory"
            )
        if not writable(run_dir):
            raise RecoupError(f"--out '{run_dir}' is not writable")
        return
    parent = next((p for p in run_dir.parents if p.exists()), Path("."))
    if not writable(parent):
        raise RecoupError(f"--out '{run_dir}': '{parent}' is not writable")


@contextlib.contextmanager
def lock_run_dir(run_dir: Path) -> Iterator[None]:
    """An exclusive lock on ``run_dir`` for one ``recoup run`` (``flock`` on its ``.recoup.lock``; the
    kernel drops it when the process dies, so a killed run never leaves a stale lock). A second run
    into the same directory stops with one line instead of computing every stage again."""
    import fcntl

    fh = open(run_dir / LOCK_FILE, "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise RecoupError(
                f"another recoup run ({holder}) is running in '{run_dir}'; wait for it to finish "
                f"or choose another --out"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
        fh.flush()
        yield
    finally:
        fh.close()


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def run_recipe(
    recipe: Recipe,
    out: str | Path | None = None,
    store: Store | None = None,
    executor: Executor | None = None,
    report: bool = True,
) -> RunOutcome:
    """Run every stage of ``recipe`` not already finished in ``out``; record it all in ``store``."""
    started = time.time()
    run_dir = Path(out or default_run_dir(recipe)).expanduser().resolve()
    check_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with lock_run_dir(run_dir):
        return _run_locked(recipe, run_dir, started, store, executor, report)


def _run_locked(
    recipe: Recipe, run_dir: Path, started: float, store: Store | None, executor: Executor | None, report: bool
) -> RunOutcome:
    own_store = store is None
    store = store or Store()
    executor = executor or LocalExecutor()
    run_id = make_run_id(recipe, run_dir)
    log.info("run %s in %s (store %s)", run_id, run_dir, store.path)
    plan = build_plan(recipe, cache.source_fingerprint(recipe.model))
    keys = stage_keys(plan)
    dirs = {s.name: str(cache.stage_dir(run_dir, s.name, keys[s.name])) for s in plan}
    store.start_run(run_id, recipe.name, recipe.to_dict(), recipe.source, str(run_dir))
    for i, spec in enumerate(plan):
        store.plan_stage(run_id, spec.name, i, spec.kind, keys[spec.name], dirs[spec.name], spec.labels)
    _write_json_atomic(
        run_dir / "run.json",
        {
            "run_id": run_id,
            "store": str(store.path),
            "recipe": recipe.to_dict(),
            "stages": [{**s.to_dict(), "key": keys[s.name], "dir": dirs[s.name]} for s in plan],
        },
    )
    by_name = {s.name: s for s in plan}
    done: set[str] = set()
    submitted: set[str] = set()
    ran: list[str] = []
    reused: list[str] = []

    def record(spec: StageSpec, res: JobResult) -> None:
        store.stage_finished(
            run_id,
            spec.name,
            res.result,
            res.status == "cached",
            res.seconds,
            _metrics_of(spec, res.result),
            _artifacts_of(spec, res.out_dir),
        )
        (reused if res.status == "cached" else ran).append(spec.name)
        done.add(spec.name)
        log.info("stage %s: %s%s", spec.name, res.status, "" if res.status == "cached" else f" in {res.seconds:.1f}s")

    try:
        while len(done) < len(plan):
            progress = len(done) + len(submitted)
            for i, spec in enumerate(plan):
                if spec.name in submitted or not all(n in done for n in spec.needs):
                    continue
                finished = cache.read_result(Path(dirs[spec.name]))
                if finished is None and executor.pending_count() >= executor.capacity():
                    continue
                submitted.add(spec.name)
                job = Job(
                    spec.name,
                    spec.kind,
                    spec.params,
                    keys[spec.name],
                    {n: dirs[n] for n in spec.needs},
                    dirs[spec.name],
                    i,
                )
                if finished is not None:
                    record(spec, JobResult(spec.name, keys[spec.name], "cached", finished, dirs[spec.name], 0.0))
                    continue
                store.stage_started(run_id, spec.name)
                executor.submit(job)
            if len(done) == len(plan):
                break
            if executor.pending_count() == 0:
                if len(done) + len(submitted) == progress:
                    raise RuntimeError(f"stages that can never run: {sorted(set(by_name) - done)}")
                continue  # cached stages unblocked others: plan again
            job, res = _next(executor, store, run_id)
            record(by_name[job.name], res)
    except KeyboardInterrupt:
        store.interrupt_run(run_id)
        raise
    except BaseException:
        store.finish_run(run_id, "failed")
        raise
    finally:
        executor.close()

    report_path, summary = None, ""
    if report:
        from recoup.runs.report import write_report

        report_path, summary = write_report(store, run_id, run_dir / "report")
    store.finish_run(run_id, "done", summary, str(report_path) if report_path else None)
    outcome = RunOutcome(run_id, run_dir, store.path, report_path, summary, ran, reused, time.time() - started)
    if own_store:
        store.close()
    return outcome


def _next(executor: Executor, store: Store, run_id: str) -> tuple[Job, JobResult]:
    """The executor's next finished job; a failing stage is marked failed in the store, then its error re-raised."""
    try:
        return executor.next_done()
    except JobFailed as failed:
        store.stage_failed(run_id, failed.job.name, f"{type(failed.error).__name__}: {failed.error}")
        raise failed.error from None
