"""The stages a run composes: compress, recover, evaluate. Each is a function of plain data.

A stage function takes its parameters (a slice of the recipe, JSON-serialisable), the output
directories of the stages it needs, and a fresh directory to write into; it returns a JSON-able
result. It never touches the results store or the cache bookkeeping (``runs/cache.py`` and
``runs/run.py`` do), so any executor, local or distributed, can run it.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import time
from pathlib import Path
from typing import Any, Callable

from recoup.errors import RecoupError
from recoup.registry import Registry

log = logging.getLogger(__name__)

ARTIFACT_DIR = "artifact"
RECOVERY_DIR = "recovery"
_COMPRESS_META = ("name", "calibration")
_RECOVER_META = ("name", "method", "base", "transfer")


# ----------------------------------------------------------------------------- method configs

def compress_config(step: dict):
    """The compression stage's typed config for a recipe step (method + its keys)."""
    try:
        from recoup.compress import CompressConfig
    except ImportError as exc:
        raise RecoupError(f"compression is not available in this installation ({exc})") from None
    return CompressConfig.from_dict({k: v for k, v in step.items() if k not in _COMPRESS_META and k != "_where"})


@dataclasses.dataclass(frozen=True)
class RecoveryMethod:
    """How a run fits one recovery method: its typed config and ``fit(loaded, config) -> (Recovery, record)``."""

    config: Callable[[dict], Any]
    fit: Callable[[Any, Any], tuple[Any, dict]]


RECOVERY_METHODS: Registry[RecoveryMethod] = Registry("recovery method")


def _soft_prompt_config(d: dict):
    from recoup.recover.soft_prompt import SoftPromptConfig

    return SoftPromptConfig.from_dict(d)


def _soft_prompt_fit(loaded, config) -> tuple[Any, dict]:
    from recoup.recover.soft_prompt import fit_soft_prompt

    prompt, result = fit_soft_prompt(loaded, config)
    base = (prompt.meta.get("train") or {}).get("val_loss_without_prompt")
    return prompt, {"config": config.to_dict(), "train": result.to_dict(), "val_loss_without_recovery": base}


RECOVERY_METHODS.register("soft-prompt", RecoveryMethod(_soft_prompt_config, _soft_prompt_fit))


def recovery_config(step: dict):
    """The recovery method's typed config for a recipe step (unknown method -> did-you-mean)."""
    method = RECOVERY_METHODS.get(step["method"])
    return method.config({k: v for k, v in step.items() if k not in _RECOVER_META and k != "_where"})


# ----------------------------------------------------------------------------- stage functions

def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _model_source(params: dict, inputs: dict[str, Path]) -> str:
    """The model a stage reads: the upstream compression artifact, or the recipe's model."""
    base = params.get("base")
    if base:
        return str(inputs[base] / ARTIFACT_DIR)
    return params["model"]


def run_compress(params: dict, inputs: dict[str, Path], out: Path) -> dict:
    """Load the model, draw calibration windows, compress, save the artifact under ``out/artifact``."""
    from recoup.compress import compress
    from recoup.artifact.store import save_artifact
    from recoup.data.calibration import calibration_windows
    from recoup.artifact import load_model

    cal = params["calibration"]
    config = compress_config(params["config"])
    # The model stays on CPU; on CUDA the engine moves one decoder layer at a time to the device.
    loaded = load_model(params["model"], dtype=params["dtype"], device="cpu")
    calib = calibration_windows(loaded.tokenizer, cal["corpus"], cal["nsamples"], cal["seqlen"], params["seed"])
    t0 = time.time()
    report = compress(loaded, config, calib, device=params["device"])
    seconds = time.time() - t0
    save_artifact(loaded, report, out / ARTIFACT_DIR)
    return {"artifact": ARTIFACT_DIR, "report": report.to_dict(), "calibration": calib.protocol,
            "compress_seconds": round(seconds, 3)}


def run_recover(params: dict, inputs: dict[str, Path], out: Path) -> dict:
    """Fit a recovery on the (frozen) compressed model and save it under ``out/recovery``."""
    from recoup.artifact import load_model

    method = RECOVERY_METHODS.get(params["method"])
    config = method.config(params["config"])
    loaded = load_model(_model_source(params, inputs), dtype=params["dtype"], device=params["device"])
    recovery, record = method.fit(loaded, config)
    recovery.save(out / RECOVERY_DIR)
    return {"recovery": RECOVERY_DIR, "method": params["method"], **record}


def run_evaluate(params: dict, inputs: dict[str, Path], out: Path) -> dict:
    """Evaluate the model (dense, or an upstream artifact), with an upstream recovery attached if named."""
    from recoup.evaluate.runner import EvalSettings, evaluate
    from recoup.artifact import load_model

    ev = params["evaluate"]
    loaded = load_model(_model_source(params, inputs), dtype=params["dtype"], device=params["device"])
    recovery = None
    if params.get("recovery"):
        from recoup.recover.io import load_recovery

        recovery = load_recovery(inputs[params["recovery"]] / RECOVERY_DIR)
    limits = ev.get("limits") or {}
    groups: dict = {}  # limit -> tasks, in order (one evaluate() call per distinct limit)
    for task in ev["tasks"]:
        groups.setdefault(limits.get(task, ev["limit"]), []).append(task)
    merged: dict = {}
    for limit, tasks in groups.items():
        settings = EvalSettings(seqlen=ev["seqlen"], limit=limit, batch_size=ev["batch_size"], seed=params["seed"],
                                options=dict(ev.get("options") or {}))
        out = evaluate(loaded, tasks, settings, recovery)
        merged.setdefault("model", out["model"])
        merged.setdefault("results", {}).update(out["results"])
        merged.setdefault("protocol", {**out["protocol"], "limits": {}})["limits"].update({t: limit for t in tasks})
    merged["results"] = {t: merged["results"][t] for t in ev["tasks"]}
    return {"evaluation": merged}


STAGE_FUNCTIONS: dict[str, Callable[[dict, dict[str, Path], Path], dict]] = {
    "compress": run_compress, "recover": run_recover, "evaluate": run_evaluate}

# The code each stage kind runs: its hash is part of the stage's cache key.
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "compress": ("compress", "model", "data", "runs/stages.py"),
    "recover": ("recover", "model", "data", "evaluate/perplexity.py", "runs/stages.py"),
    "evaluate": ("evaluate", "model", "data", "recover", "runs/stages.py"),
}


def execute(kind: str, params: dict, inputs: dict[str, Path], out: Path) -> dict:
    """Run one stage function, adding its wall time and the process's peak RSS to the result."""
    try:
        fn = STAGE_FUNCTIONS[kind]
    except KeyError:
        raise RecoupError(f"unknown stage kind '{kind}'") from None
    t0 = time.time()
    result = fn(params, inputs, out)
    result["seconds"] = round(time.time() - t0, 3)
    result["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    log.info("stage %s done in %.1fs (peak RSS %.0f MB)", kind, result["seconds"], result["peak_rss_mb"])
    return result
