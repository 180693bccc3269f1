"""The Ray executor: each stage of a run or sweep is a Ray task (https://docs.ray.io, Moritz et al. 2018).

``recoup run|sweep RECIPE --executor ray [--address ADDR]``. With no address (and no ``RAY_ADDRESS``)
a local Ray cluster is started for the run and shut down at its end; with one, the run joins that
cluster. recoup schedules nothing itself: the driver (``runs/run.py``) submits a stage once the stages
it reads have finished, Ray places it, and the driver records each result in the store as it comes
back. Workers never touch the store.

- Resources: a stage whose ``device`` is ``cuda``/``cuda:N`` asks for one GPU, one with ``device: auto``
  asks for one GPU when the cluster has any, every other stage ``cpus_per_stage`` CPUs.
- Cache: a job is the same plain :class:`~recoup.runs.executor.Job` the local executor runs, with the
  same key and output directory, so a stage finished by either executor is never recomputed.
- Files: stage outputs go to the run directory, which every node must see at the same path (a shared
  file system on a multi-machine cluster).
- Failures: a worker that dies (killed, out of memory, node lost) makes Ray rerun the stage up to
  ``max_retries`` times (a killed attempt leaves only a ``.partial`` directory, removed by the next
  attempt); after that the run stops with one line naming the stage. An exception raised by the stage
  itself (bad input, a bug) is not retried. Every stage finished before the stop is kept, and the
  next ``recoup run`` resumes from it.
- Code: workers import recoup afresh, so methods, tasks or recoveries registered at runtime in the
  driver (e.g. a toy method defined in a test or a notebook) do not exist there; put them in an
  importable module that registers them on import, on every node.
"""

from __future__ import annotations

import logging
import os
import socket

from recoup.errors import RecoupError
from recoup.runs.executor import Executor, Job, JobFailed, JobResult, run_job

log = logging.getLogger(__name__)

DEFAULT_RETRIES = 2


def _import_ray():
    try:
        import ray
    except ImportError:
        raise RecoupError("the Ray executor needs Ray: pip install 'recoup[ray]' (or pip install ray)") from None
    return ray


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """One line within ``timeout`` seconds when nothing listens at a ``HOST:PORT`` / ``ray://HOST:PORT`` address
    (``ray.init`` itself retries an unreachable address for minutes). ``auto`` and ``local`` are Ray's own."""
    if address in ("auto", "local"):
        return
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RecoupError(f"ray executor: --address must be HOST:PORT, ray://HOST:PORT or auto (got '{address}')")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise RecoupError(
            f"ray executor: nothing answers at {address} ({why}); start a cluster there "
            f"(`ray start --head`) or leave --address out for a local one"
        ) from None


def wants_gpu(job: Job, cluster_gpus: float) -> bool:
    """Whether the stage of ``job`` runs on a CUDA device: asked for explicitly, or ``auto`` on a GPU cluster."""
    device = str(job.params.get("device") or "cpu")
    return device.startswith("cuda") or (device == "auto" and cluster_gpus > 0)


class RayExecutor(Executor):
    """Runs each job as a Ray task; hands results back as they complete, in any order."""

    def __init__(
        self,
        address: str | None = None,
        max_retries: int = DEFAULT_RETRIES,
        cpus_per_stage: int = 1,
        num_cpus: int | None = None,
    ) -> None:
        if max_retries < 0 or cpus_per_stage < 1:
            raise RecoupError("ray executor: max_retries must be >= 0 and cpus_per_stage >= 1")
        ray = self._ray = _import_ray()
        self.max_retries, self.cpus_per_stage = max_retries, cpus_per_stage
        self._owns = not ray.is_initialized()
        if self._owns:
            address = address or os.environ.get("RAY_ADDRESS") or None
            if address is not None:
                check_reachable(address)
            kwargs = {"include_dashboard": False, "configure_logging": False, "log_to_driver": True}
            if address is None:  # a local cluster just for this run
                kwargs.update(num_cpus=num_cpus, object_store_memory=100 * 2**20)
            try:
                ray.init(address=address, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise RecoupError(
                    f"ray executor: cannot start or join a Ray cluster at {address or 'local'}: {exc}"
                ) from None
        res = ray.cluster_resources()
        self._gpus = float(res.get("GPU", 0))
        self._slots = max(1, int(res.get("CPU", 1) // cpus_per_stage) + int(self._gpus))
        self._remote = ray.remote(run_job)
        self.pending: dict = {}  # ObjectRef -> Job
        log.info(
            "ray executor: %s cluster, %d CPU, %g GPU, up to %d retries per stage",
            "local" if address is None else address,
            int(res.get("CPU", 0)),
            self._gpus,
            max_retries,
        )

    def submit(self, job: Job) -> None:
        gpu = wants_gpu(job, self._gpus)
        opts = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": self.cpus_per_stage}
        ref = self._remote.options(
            name=f"recoup:{job.name}", max_retries=self.max_retries, retry_exceptions=False, **opts
        ).remote(job)
        self.pending[ref] = job

    def next_done(self) -> tuple[Job, JobResult]:
        """The next finished job; of those ready at once, successes come first so the driver records them."""
        ray = self._ray
        if not self.pending:
            raise RuntimeError("next_done() with nothing submitted")
        ray.wait(list(self.pending), num_returns=1)
        ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)
        failure = None
        for ref in ready:
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as exc:
                failure = failure or (ref, exc)
                continue
            return self.pending.pop(ref), result
        ref, exc = failure
        raise self._failed(self.pending.pop(ref), exc)

    def _failed(self, job: Job, exc: Exception) -> JobFailed:
        ray = self._ray
        if isinstance(exc, ray.exceptions.RayTaskError):  # the stage itself raised: hand back its own exception
            err = getattr(exc, "cause", None) or exc.as_instanceof_cause()
            return JobFailed(job, err if isinstance(err, Exception) else RecoupError(str(exc)))
        # the worker or its node died, every retry used up
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return JobFailed(
            job,
            RecoupError(
                f"stage {job.name}: its Ray worker died {self.max_retries + 1} time(s) ({type(exc).__name__}: "
                f"{first[:160]}); stopped; finished stages are kept, run again to resume"
            ),
        )

    def pending_count(self) -> int:
        return len(self.pending)

    def capacity(self) -> int:
        return self._slots

    def close(self) -> None:
        ray = self._ray
        for ref in list(self.pending):
            ray.cancel(ref, force=True)
        self.pending.clear()
        if self._owns and ray.is_initialized():
            ray.shutdown()
