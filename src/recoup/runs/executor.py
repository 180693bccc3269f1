"""Executors run stage jobs: locally and sequentially, or on a Ray cluster; another engine plugs in the same way.

A :class:`Job` is plain, picklable data (stage kind, parameters, key, the directories of the
stages it reads, the run directory); :func:`run_job` is a top-level function that needs nothing
else, writes the stage's output directory atomically and returns a :class:`JobResult`. Workers
never touch the results store: the driver (``runs/run.py``) records each result as it arrives.

The driver submits jobs whose inputs are ready (up to :meth:`Executor.capacity`) and calls
:meth:`Executor.next_done` for the next finished one. ``local`` runs them here, one at a time; ``ray``
(:mod:`recoup.runs.ray_executor`) runs each as a Ray task on a local or remote cluster, with the run directory on a
shared file system.
"""

from __future__ import annotations

import abc
import dataclasses
import gc
import logging
import os
import time
from pathlib import Path

from recoup.errors import RecoupError
from recoup.runs import cache
from recoup.runs.stages import execute

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Job:
    """One stage to run: everything :func:`run_job` needs, as plain data."""

    name: str
    kind: str
    params: dict
    key: str
    inputs: dict[str, str]  # needed stage name -> its finished output directory
    out_dir: str  # the stage's final directory
    order: int = 0  # position in the plan (the local executor runs the lowest ready one first)


@dataclasses.dataclass
class JobResult:
    name: str
    key: str
    status: str  # done | cached
    result: dict
    out_dir: str
    seconds: float


def run_job(job: Job) -> JobResult:
    """Run one stage unless its output already exists; the output directory appears atomically."""
    final = Path(job.out_dir)
    done = cache.read_result(final)
    if done is not None:
        return JobResult(job.name, job.key, "cached", done, job.out_dir, 0.0)
    log.info("stage %s: running (key %s)", job.name, job.key[:12])
    t0, cpu0 = time.time(), _cpu_seconds()
    tmp = cache.begin(final)
    result = execute(job.kind, job.params, {k: Path(v) for k, v in job.inputs.items()}, tmp)
    result = {
        "stage": job.name,
        "kind": job.kind,
        "key": job.key,
        **result,
        "cpu_seconds": round(_cpu_seconds() - cpu0, 2),
    }  # user + system, all threads
    cache.commit(tmp, final, result)
    return JobResult(
        job.name, job.key, "done", cache.read_result(final) or result, job.out_dir, round(time.time() - t0, 3)
    )


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class JobFailed(Exception):
    """Raised by :meth:`Executor.next_done` when a job failed; ``error`` is the job's own exception."""

    def __init__(self, job: Job, error: BaseException) -> None:
        super().__init__(f"stage {job.name} failed: {error}")
        self.job, self.error = job, error


class Executor(abc.ABC):
    """Runs submitted jobs and hands back finished ones, one at a time, in any order."""

    @abc.abstractmethod
    def submit(self, job: Job) -> None:
        """Queue ``job`` (its inputs are finished)."""

    @abc.abstractmethod
    def next_done(self) -> tuple[Job, JobResult]:
        """Block until some submitted job finishes; return it and its result, or raise :class:`JobFailed`."""

    @abc.abstractmethod
    def pending_count(self) -> int:
        """Jobs submitted and not yet handed back."""

    def capacity(self) -> int:
        """How many jobs it wants in flight at once (the driver keeps the rest, so the store says 'pending')."""
        return 1 << 30

    def close(self) -> None:
        """Release workers (nothing to do locally)."""


class LocalExecutor(Executor):
    """Runs jobs in this process, one at a time, lowest plan position first."""

    def __init__(self) -> None:
        self._queue: list[Job] = []

    def submit(self, job: Job) -> None:
        self._queue.append(job)

    def next_done(self) -> tuple[Job, JobResult]:
        if not self._queue:
            raise RuntimeError("next_done() with nothing submitted")
        job = min(self._queue, key=lambda j: j.order)
        self._queue.remove(job)
        try:
            return job, run_job(job)
        except Exception as exc:
            raise JobFailed(job, exc) from exc
        finally:
            gc.collect()

    def pending_count(self) -> int:
        return len(self._queue)

    def capacity(self) -> int:
        return 1


def _ray_executor(**options) -> Executor:
    from recoup.runs.ray_executor import RayExecutor  # imports ray only when asked for

    return RayExecutor(**options)


EXECUTORS = {"local": LocalExecutor, "ray": _ray_executor}


def make_executor(name: str, address: str | None = None) -> Executor:
    """The executor called ``name``; ``address`` is the cluster to join (Ray; none: a local cluster)."""
    if name not in EXECUTORS:
        from recoup.registry import unknown_name_message

        raise RecoupError(unknown_name_message("executor", name, EXECUTORS))
    if address is not None:
        if name == "local":
            raise RecoupError("--address is for a cluster executor (--executor ray), not the local one")
        return EXECUTORS[name](address=address)
    return EXECUTORS[name]()
