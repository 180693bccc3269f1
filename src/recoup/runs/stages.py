"""The stage functions, the API of recoup: each takes one typed job (:mod:`recoup.recipe.jobs`).

- :func:`compress` (:class:`CompressJob`): load, draw calibration windows, compress, save the artifact;
- :func:`evaluate` (:class:`EvalJob`): load a model (dense or artifact), attach a recovery, run the tasks;
- :func:`recover` (:class:`RecoverJob`): fit any registered recovery method on a (compressed) model, save it;
- :func:`export` (:class:`ExportJob`): write an artifact (+ recovery) for a destination.

A CLI command parses its flags into the job and calls the function; a recipe step builds the same job.
:func:`execute` runs one stage of a recipe for an executor: it turns the stage's plain-data parameters
(and the directories of the stages it needs) into the job. Stage functions never touch the results store
or the cache bookkeeping (``runs/cache.py`` and ``runs/run.py`` do), so any executor can run them.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

from recoup.artifact.report import peak_rss_mb
from recoup.errors import RecoupError
from recoup.model import parallel
from recoup.model.recovery import RUN_RECORD, TRAIN_RECORD
from recoup.recipe.jobs import CompressJob, EvalJob, ExportJob, RecoverJob
from recoup.safeio import dumps

log = logging.getLogger(__name__)

ARTIFACT_DIR = "artifact"
RECOVERY_DIR = "recovery"
EXPORT_DIR = "export"


# ----------------------------------------------------------------------------- the stage functions


def compress(job: CompressJob) -> dict:
    """Compress ``job.model`` with ``job.config`` and write the artifact to ``job.out``."""
    from recoup.artifact import load_model
    from recoup.artifact.layerwise import LayerwiseWriter
    from recoup.artifact.space import check_space, estimate_bytes, no_space_as_error
    from recoup.artifact.store import save_artifact
    from recoup.compress import METHODS
    from recoup.compress import compress as run_engine
    from recoup.data.calibration import calibration_windows
    from recoup.model.lazy import load_lazy

    if job.out is None:
        raise RecoupError("compress: give --out DIR")
    # The model stays on CPU; on CUDA the engine moves one decoder layer at a time to the device. With lazy
    # weights the model is a skeleton and each decoder layer is read from the checkpoint when it is reached.
    lazy = load_lazy(job.model, job.dtype) if job.lazy else None
    loaded, weights = lazy if lazy is not None else (load_model(job.model, dtype=job.dtype, device="cpu"), None)
    calib = None
    if METHODS.get(job.config.method).stats != "none":
        calib = calibration_windows(loaded.tokenizer, job.calib, job.nsamples, job.seqlen, job.seed, bos=job.bos)
    # an output that cannot fit is refused before the compression runs, not after
    check_space(job.out, estimate_bytes(loaded.model, job.config.bits, job.config.sparsity, job.storage))
    t0 = time.time()
    with no_space_as_error(job.out):
        if weights is None:
            report = run_engine(loaded, job.config, calib, device=job.device)
            seconds = time.time() - t0
            out = save_artifact(loaded, report, job.out, storage=job.storage)
        else:
            writer = LayerwiseWriter(loaded, weights, job.out, job.storage, job.config.bits)
            try:
                report = run_engine(
                    loaded, job.config, calib, device=job.device, weights=weights, on_layer=writer.add_layer
                )
            except BaseException:
                writer.close()
                raise
            seconds = time.time() - t0
            out = writer.finish(report)
    manifest = json.loads((out / "recoup.json").read_text())
    return {
        "artifact": str(out),
        "report": report.to_dict(),
        "calibration": calib.protocol if calib else None,
        "compress_seconds": round(seconds, 3),
        "storage": manifest.get("storage"),
    }


def _recovery_for(job: EvalJob, loaded) -> Any:
    if job.recovery:
        from recoup.recover.methods import load_recovery

        return load_recovery(job.recovery)
    if job.prompt_text is not None:
        from recoup.recover.hard_prompt import HardPrompt

        return HardPrompt.from_text(job.prompt_text, loaded.tokenizer)
    return None


def evaluate(job: EvalJob, judge: Any = None) -> dict:
    """Evaluate ``job.model`` (dense or an artifact), with ``job.recovery`` / ``job.prompt_text`` attached.

    ``limits`` gives some tasks their own limit (one scoring pass per distinct limit). ``judge`` overrides
    the judge the job's keys describe (tests pass a stand-in)."""
    from recoup.artifact import load_model
    from recoup.evaluate.judge import build_judge
    from recoup.evaluate.runner import EvalSettings, attach
    from recoup.evaluate.runner import evaluate as run_tasks

    options = dict(job.options)
    judge = judge or build_judge(
        job.judge_url,
        job.judge_model,
        job.judge_key_env,
        job.judge_local,
        job.judge_retries,
        dtype=job.dtype,
        device=job.device,
        timeout=job.judge_timeout,
        max_tokens=job.judge_max_tokens,
    )
    if judge is not None:
        options["judge"] = judge
    loaded = load_model(job.model, dtype=job.dtype, device=job.device, device_map=job.device_map)
    recovery = _recovery_for(job, loaded)
    run_loaded = attach(loaded, recovery)  # once, for every pass below
    groups: dict = {}  # limit -> tasks, in order (one pass per distinct limit)
    for task in job.tasks:
        groups.setdefault(job.limits.get(task, job.limit), []).append(task)
    merged: dict = {}
    for limit, tasks in groups.items():
        settings = EvalSettings(
            seqlen=job.seqlen, limit=limit, batch_size=job.batch_size, seed=job.seed, bos=job.bos, options=options
        )
        out = run_tasks(run_loaded, tasks, settings, recovery, attached=True)
        merged.setdefault("model", out["model"])
        merged.setdefault("results", {}).update(out["results"])
        merged.setdefault("protocol", {**out["protocol"], "limits": {}})["limits"].update({t: limit for t in tasks})
    merged["results"] = {t: merged["results"][t] for t in job.tasks}
    skipped = getattr(job, "skipped", {})
    if skipped:  # a suite's tasks whose data is not installed: named in the result, never silently dropped
        merged["skipped"] = dict(skipped)
    bad = mark_non_finite(merged["results"])
    if job.json and parallel.is_main():  # under torchrun every rank has the gathered results; rank 0 writes
        path = Path(job.json).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dumps(merged, indent=2))
    if bad:
        raise RecoupError(
            f"{bad[0]} is not a finite number; the result is marked failed"
            f"{' in ' + job.json if job.json else ''} (a diverged recovery or a broken model?)"
        )
    return merged


def mark_non_finite(results: dict[str, dict]) -> list[str]:
    """Mark each task result whose headline metric (its declared ``primary`` and the usual names: ppl,
    acc, em, ...) is NaN/Inf ``failed``; returns ``["task: metric=nan", ...]``. (JSON writes such values as
    null: :func:`recoup.safeio.dumps`.)"""
    from recoup.runs.metrics import PRIMARY_ORDER

    bad = []
    for task, res in results.items():
        names = [res["primary"]] if isinstance(res.get("primary"), str) else []
        names += [n for n in PRIMARY_ORDER if n not in names]
        wrong = [f"{n}={res[n]}" for n in names if isinstance(res.get(n), float) and not math.isfinite(res[n])]
        if wrong:
            res["failed"] = "non-finite " + ", ".join(wrong)
            bad.append(f"{task}: {wrong[0]}")
    return bad


def recover(job: RecoverJob) -> dict:
    """Fit ``job.method`` on ``job.model`` (whose weights stay bit-identical) and save it to ``job.out``."""
    from recoup.artifact import load_model
    from recoup.recover.methods import RECOVERIES
    from recoup.recover.task_data import training_data
    from recoup.recover.train import training_context

    if job.out is None:
        raise RecoupError("recover: give --out DIR")
    method = RECOVERIES.get(job.method)
    if _streams(job, method):  # one decoder layer of the artifact (and of its dense source) in memory at a time
        from recoup.artifact.lazy import load_artifact_lazy

        loaded, weights = load_artifact_lazy(job.model, job.dtype)
        started = time.time()
        recovery, result = method.fit_lazy(loaded, weights, job.config)
    else:
        loaded = load_model(job.model, dtype=job.dtype, device=job.device, device_map=job.device_map)
        data = training_data(loaded.tokenizer, job.config) if method.trains else None
        started = time.time()
        with training_context(loaded.model, bool(getattr(job.config, "gradient_checkpointing", False))):
            recovery, result = method.fit(loaded, job.config, data)
    out = Path(job.out).expanduser()
    main = parallel.is_main()  # under torchrun / accelerate, rank 0 alone saves
    if main:
        recovery.save(out)
    summary: dict = {
        "model": job.model,
        "method": job.method,
        "config": job.config.to_dict(),
        "out": str(out),
        "parameters": recovery.num_parameters(),
        "total_seconds": round(time.time() - started, 1),
    }
    if result is not None:
        summary.update(
            {
                "steps": result.steps,
                "seconds": round(result.seconds, 1),
                "cpu_seconds": result.cpu_seconds,
                "tokens": result.tokens,
                "best_val_loss": result.best_val_loss,
                "best_step": result.best_step,
                "train": result.to_dict(),
            }
        )
        base = (getattr(recovery, "meta", {}).get("train") or {}).get("val_loss_without_prompt")
        summary["val_loss_without_recovery"] = base
        if main and not (out / TRAIN_RECORD).is_file():
            (out / TRAIN_RECORD).write_text(dumps({"method": job.method, "history": result.to_dict()}, indent=1))
    if main:
        (out / RUN_RECORD).write_text(dumps(summary, indent=2, default=str))
    return summary


def _streams(job: RecoverJob, method) -> bool:
    """Whether ``job`` reads its artifact layer by layer: the method can, ``--lazy`` (the default), on CPU, and
    the model is a local artifact (a dense model or a hub id loads whole)."""
    from recoup.model.load import resolve_source

    if method.fit_lazy is None or not job.lazy or job.device_map or str(job.device) != "cpu":
        return False
    return resolve_source(job.model)[0] == "artifact"


def export(job: ExportJob) -> dict:
    """Write a compressed artifact (and its recovery) in a destination format (:mod:`recoup.artifact.export`)."""
    from recoup.artifact.export import export as run_export

    return run_export(job)


def best_ppl(summary: dict) -> str:
    loss = summary.get("best_val_loss")
    return f"{math.exp(loss):.3f}" if isinstance(loss, (int, float)) else "n/a"


# ----------------------------------------------------------------------------- recipe stages


def _model_source(params: dict, inputs: dict[str, Path]) -> str:
    """The model a stage reads: the upstream compression artifact, or the recipe's model."""
    base = params.get("base")
    return str(inputs[base] / ARTIFACT_DIR) if base else params["model"]


def _job_keys(params: dict) -> dict:
    return {k: v for k, v in params.items() if k not in ("base", "fingerprint", "recovery_stage")}


def _compress_stage(params: dict, inputs: dict[str, Path], out: Path) -> dict:
    job = CompressJob.from_flat({**_job_keys(params), "out": str(out / ARTIFACT_DIR)})
    result = compress(job)
    result["artifact"] = ARTIFACT_DIR
    return result


def _recover_stage(params: dict, inputs: dict[str, Path], out: Path) -> dict:
    job = RecoverJob.from_flat(
        {**_job_keys(params), "model": _model_source(params, inputs), "out": str(out / RECOVERY_DIR)}
    )
    summary = recover(job)
    record = {
        "recovery": RECOVERY_DIR,
        "method": job.method,
        "config": job.config.to_dict(),
        "parameters": summary["parameters"],
        "val_loss_without_recovery": summary.get("val_loss_without_recovery"),
    }
    if "train" in summary:
        record["train"] = summary["train"]
    return record


def _evaluate_stage(params: dict, inputs: dict[str, Path], out: Path) -> dict:
    keys = _job_keys(params)
    ref = keys.pop("recovery", None)
    job = EvalJob.from_flat(
        {**keys, "model": _model_source(params, inputs), "recovery": str(inputs[ref] / RECOVERY_DIR) if ref else None}
    )
    return {"evaluation": evaluate(job)}


def _export_stage(params: dict, inputs: dict[str, Path], out: Path) -> dict:
    keys = _job_keys(params)
    keys.pop("model", None)
    ref = keys.pop("recovery", None)
    job = ExportJob.from_flat(
        {
            **keys,
            "source": str(inputs[params["base"]] / ARTIFACT_DIR),
            "recovery": str(inputs[ref] / RECOVERY_DIR) if ref else None,
            "out": str(out / EXPORT_DIR),
        }
    )
    result = export(job)
    return {**{k: v for k, v in result.items() if k != "out"}, "export": EXPORT_DIR}


STAGE_FUNCTIONS: dict[str, Callable[[dict, dict[str, Path], Path], dict]] = {
    "compress": _compress_stage,
    "recover": _recover_stage,
    "evaluate": _evaluate_stage,
    "export": _export_stage,
}

# The code each stage kind runs: its hash is part of the stage's cache key.
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "compress": ("compress", "artifact", "model", "data", "recipe", "runs/stages.py"),
    "recover": ("recover", "artifact", "model", "data", "recipe", "runs/stages.py"),
    "evaluate": ("evaluate", "artifact", "model", "data", "recover", "recipe", "runs/stages.py"),
    "export": ("artifact", "model", "recipe", "runs/stages.py"),
}


def execute(kind: str, params: dict, inputs: dict[str, Path], out: Path) -> dict:
    """Run one recipe stage, adding its wall time and the process's peak RSS to the result."""
    try:
        fn = STAGE_FUNCTIONS[kind]
    except KeyError:
        raise RecoupError(f"unknown stage kind '{kind}'") from None
    t0 = time.time()
    result = fn(params, inputs, out)
    result["seconds"] = round(time.time() - t0, 3)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    log.info("stage %s done in %.1fs (peak RSS %.0f MB)", kind, result["seconds"], result["peak_rss_mb"])
    return result


__all__ = ["compress", "evaluate", "recover", "execute", "best_ppl", "ARTIFACT_DIR", "RECOVERY_DIR"]
