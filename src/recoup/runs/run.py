"""Run a recipe: plan the stages, reuse finished ones, run the rest through an executor, record, report.

The driver is the only writer of the results store. Each stage result is recorded as soon as it
arrives, in one transaction, so a run killed at any point keeps every finished stage (its output
directory is complete on disk, its rows are in the store) and the next ``recoup run`` of the same
recipe into the same directory picks up from there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path

from recoup.recipe import Recipe
from recoup.runs import cache
from recoup.runs.executor import Executor, Job, JobFailed, JobResult, LocalExecutor
from recoup.runs.metrics import metric_rows
from recoup.runs.plan import StageSpec, build_plan
from recoup.runs.stages import ARTIFACT_DIR, RECOVERY_DIR, STAGE_CODE
from recoup.runs.store import Store

log = logging.getLogger(__name__)


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
        for metric, value in (("best_val_loss", train.get("best_val_loss")),
                              ("val_loss_without", result.get("val_loss_without_recovery")),
                              ("steps", train.get("steps")), ("seconds", train.get("seconds")),
                              ("tokens", train.get("tokens"))):
            if isinstance(value, (int, float)):
                rows.append({"task": "train", "metric": metric, "value": float(value), "n": None, "stderr": None,
                             "protocol": {"config": result.get("config")}})
        return rows
    if spec.kind == "compress":
        rep = result.get("report") or {}
        values = {"seconds": result.get("compress_seconds"), "sparsity": rep.get("sparsity"),
                  "mean_error": rep.get("mean_error"), "peak_rss_mb": rep.get("peak_rss_mb")}
        return [{"task": "compress", "metric": k, "value": float(v), "n": None, "stderr": None,
                 "protocol": {"calibration": result.get("calibration"), "config": rep.get("config")}}
                for k, v in values.items() if isinstance(v, (int, float))]
    return []


def _artifacts_of(spec: StageSpec, out_dir: str) -> dict[str, str]:
    if spec.kind == "compress":
        return {"artifact": str(Path(out_dir) / ARTIFACT_DIR)}
    if spec.kind == "recover":
        return {"recovery": str(Path(out_dir) / RECOVERY_DIR)}
    return {"result": str(Path(out_dir) / cache.RESULT)}


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def run_recipe(recipe: Recipe, out: str | Path | None = None, store: Store | None = None,
               executor: Executor | None = None, report: bool = True) -> RunOutcome:
    """Run every stage of ``recipe`` not already finished in ``out``; record it all in ``store``."""
    started = time.time()
    run_dir = Path(out or default_run_dir(recipe)).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
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
    _write_json_atomic(run_dir / "run.json", {"run_id": run_id, "store": str(store.path), "recipe": recipe.to_dict(),
                                              "stages": [{**s.to_dict(), "key": keys[s.name], "dir": dirs[s.name]}
                                                         for s in plan]})
    by_name = {s.name: s for s in plan}
    done: set[str] = set()
    submitted: set[str] = set()
    ran: list[str] = []
    reused: list[str] = []

    def record(spec: StageSpec, res: JobResult) -> None:
        store.stage_finished(run_id, spec.name, res.result, res.status == "cached", res.seconds,
                             _metrics_of(spec, res.result), _artifacts_of(spec, res.out_dir))
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
                job = Job(spec.name, spec.kind, spec.params, keys[spec.name], {n: dirs[n] for n in spec.needs},
                          dirs[spec.name], i)
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
        store.finish_run(run_id, "interrupted")
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
