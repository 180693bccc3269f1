"""Export a compressed artifact (and its recovery) in the format its destination loads.

- ``hf``: dense safetensors in a chosen dtype (transformers and everything HF-compatible);
- ``compressed-tensors``: the artifact's integer codes and scales as ``pack-quantized`` / ``int-quantized``
  (vLLM, SGLang, transformers with the ``compressed-tensors`` package);
- ``gguf``: Q4_0 / Q4_1 / Q8_0 blocks from the same codes, or F32 / F16 / BF16 (llama.cpp, Ollama).

A format is one module and one registry line below. :func:`export` validates everything (format,
source, ``out``, recovery, grid) before it loads the model, writes into a temporary sibling of ``out`` and
renames it into place, with ``recoup_export.json`` beside the weights: the compression record (method,
sparsity, bits, grid, calibration) and what the export did (format, types, merge).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from recoup.artifact.export.base import (
    FORMATS,
    GGUF_TYPES,
    SIDE_JSON,
    ArtifactInfo,
    ExportConfig,
    Exporter,
    linear_codes,
)
from recoup.artifact.export.compressed_tensors import CompressedTensorsExporter
from recoup.artifact.export.gguf import GgufExporter
from recoup.artifact.export.hf import HfExporter
from recoup.artifact.export.recovery import SUBDIR, check_recovery, describe_recovery, merge_lora, place_recovery
from recoup.errors import RecoupError

log = logging.getLogger(__name__)

FORMATS.register("hf", HfExporter())
FORMATS.register("compressed-tensors", CompressedTensorsExporter())
FORMATS.register("gguf", GgufExporter())


def export(config: ExportConfig) -> dict[str, Any]:
    """Write the artifact ``config.source`` as ``config.format`` into ``config.out``; returns a summary
    (out, format, plan, bytes, seconds, recovery). Bad input is a RecoupError before any model loads."""
    from recoup.artifact.store import load_artifact, load_qparams, read_manifest

    t0 = time.perf_counter()
    exporter = FORMATS.get(config.format)
    src = Path(config.source).expanduser()
    if not src.is_dir():
        raise RecoupError(
            f"'{config.source}' is not a directory; export takes a recoup artifact (the --out of `recoup compress`)"
        )
    manifest = read_manifest(src)
    out = Path(config.out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RecoupError(f"'{out}' already exists; export never overwrites: choose another --out or remove it")
    rec = describe_recovery(config.recovery) if config.recovery else None
    if rec is not None:
        check_recovery(rec, config.format, config.merge)
    info = ArtifactInfo(src.resolve(), manifest, load_qparams(src))
    plan = exporter.plan(info, config)
    log.info("export %s -> %s (%s): %s", src, out, config.format, plan)

    loaded = load_artifact(src, dtype="float32")
    model = merge_lora(loaded.model, rec) if rec is not None and config.merge else loaded.model
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        written = exporter.write(model, loaded.tokenizer, info, plan, config, tmp)
        placed = place_recovery(rec, tmp, out) if rec is not None and not config.merge else None
        side = _side_record(info, config, plan, written, rec, placed is not None)
        (tmp / SIDE_JSON).write_text(json.dumps(side, indent=1, default=str))
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    nbytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and SUBDIR not in f.relative_to(out).parts)
    seconds = time.perf_counter() - t0
    log.info("exported %s as %s to %s (%.1f MB, %.1fs)", src, config.format, out, nbytes / 1e6, seconds)
    return {
        "out": str(out),
        "format": config.format,
        "loader": exporter.loader,
        "plan": plan,
        **written,
        "bytes": nbytes,
        "seconds": round(seconds, 2),
        "recovery": str(out / SUBDIR) if rec is not None and not config.merge else None,
        "merged": bool(config.merge),
    }


def _side_record(
    info: ArtifactInfo,
    config: ExportConfig,
    plan: dict[str, Any],
    written: dict[str, Any],
    rec: dict[str, Any] | None,
    placed: bool,
) -> dict[str, Any]:
    """``recoup_export.json``: where the weights came from and what was done to them."""
    from recoup.version import __version__

    m = info.manifest
    return {
        "format": config.format,
        "plan": plan,
        "written": written,
        "recoup": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "artifact": {"path": str(info.path), "created": m.get("created"), "source": m.get("source")},
        "compression": {
            "method": info.recipe.get("method"),
            "recipe": info.recipe,
            "summary": m.get("summary"),
            "grid": info.describe_grid(),
            "calibration": m.get("calibration"),
        },
        "recovery": None
        if rec is None
        else {**rec, "merged": bool(config.merge), "beside": placed, "dir": SUBDIR if placed else None},
        "merge": (
            "the LoRA is merged: the weights are dense (pruned zeros filled, off the quantization grid)"
            if config.merge
            else None
        ),
    }


__all__ = ["FORMATS", "GGUF_TYPES", "ExportConfig", "Exporter", "export", "linear_codes"]
