"""Save / load a compressed model: safetensors + tokenizer + ``quant_params.safetensors`` (the grid
of each quantized linear) + ``recoup.json``, the manifest, written LAST.

Storage (``storage`` in the manifest): ``packed`` (default; format_version 2) keeps each quantized
linear as bit-packed integer codes and each sparse-only linear as a bitmask + kept values in
``packed_weights.safetensors`` (see :mod:`recoup.artifact.packing`), everything else in
``model.safetensors``; loading decodes them to the same dense fake-quant weights, bit for bit.
``dense`` (format_version 1, what older recoup wrote and still reads) keeps every weight in
``model.safetensors``. The manifest records the bytes on disk.

No silent garbage: a packed artifact's ``config.json`` names the model type
:data:`PACKED_MODEL_TYPE` (the real one is kept as ``recoup_model_type``), so plain
``transformers.AutoModelForCausalLM.from_pretrained`` fails with a message naming ``recoup export``
instead of filling the packed weights with random values; :func:`load_artifact` restores the type.

The whole directory is written to a temporary sibling and renamed into place, so a reader never
sees a half-written artifact. The manifest lists the sha256 of every other file; loading checks
them, so a corrupted or foreign directory gives one clear line. Loading never unpickles
(safetensors only, ``trust_remote_code`` off).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import platform
import shutil
from collections import Counter
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from recoup.artifact.packing import PACKED_FILE, pack_model, unpack_into
from recoup.artifact.report import CompressReport
from recoup.errors import RecoupError
from recoup.model.lazy import TensorFile
from recoup.model.load import ARTIFACT_MANIFEST, LoadedModel, check_finite, file_sha256, model_fingerprint, parse_dtype
from recoup.paths import member
from recoup.registry import unknown_name_message
from recoup.safeio import dumps

log = logging.getLogger(__name__)

FORMAT = "recoup-compressed"
FORMAT_VERSION = 2  # newest this recoup reads; 2 = packed storage (dense artifacts are still written as 1)
QPARAMS_FILE = "quant_params.safetensors"
STORAGES = ("packed", "dense")
DEFAULT_STORAGE = "packed"
PACKED_MODEL_TYPE = (
    "recoup-packed (a recoup artifact with bit-packed weights: load it with recoup, "
    "or run `recoup export` to get a model transformers, vLLM or llama.cpp loads)"
)
REAL_MODEL_TYPE_KEY = "recoup_model_type"


def _versions() -> dict[str, str]:
    import transformers

    from recoup.version import __version__

    return {
        "recoup": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def save_artifact(
    loaded: LoadedModel, report: CompressReport, out_dir: str | Path, storage: str = DEFAULT_STORAGE
) -> Path:
    """Write ``loaded`` (already compressed, see :func:`recoup.compress.compress`) and ``report`` to ``out_dir``.

    storage: ``packed`` (quantized linears as bit-packed integer codes, sparse ones as a bitmask +
    kept values, see :mod:`recoup.artifact.packing`) or ``dense`` (fake-quant weights in the model dtype).
    An existing recoup artifact at ``out_dir`` is replaced; any other existing non-empty path is refused.
    """
    fields = artifact_fields(loaded, report)
    return _write(loaded, fields, report.qparams, out_dir, storage)


def artifact_fields(loaded: LoadedModel, report: CompressReport) -> dict[str, Any]:
    """The manifest fields that describe the compression of ``loaded`` by ``report``."""
    return {
        "source": {
            "model": loaded.source,
            "path": str(loaded.path) if loaded.path else None,
            "sha256": model_fingerprint(loaded.path) if loaded.path else None,
        },
        "model_type": report.model_type,
        "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
        "recipe": report.config,
        "calibration": report.calibration,
        "summary": {
            "sparsity": report.sparsity,
            "mean_error": report.mean_error,
            "linears": len(report.linears),
            "bits": report.config.get("bits"),
            "group_size": report.config.get("group_size"),
            "sym": report.config.get("sym"),
            "pattern": report.config.get("pattern"),
        },
        "layers": [r.to_dict() for r in report.linears],
        "seconds": report.seconds,
        "peak_rss_mb": report.peak_rss_mb,
    }


def repack_artifact(src: str | Path, out_dir: str | Path, storage: str = DEFAULT_STORAGE) -> Path:
    """Rewrite the artifact at ``src`` with another ``storage`` into ``out_dir`` (same weights, recipe,
    calibration and per-layer records; a new ``created`` and ``storage``)."""
    loaded = load_artifact(src)
    fields = {k: loaded.manifest[k] for k in _FIELDS if k in loaded.manifest}
    return _write(loaded, fields, load_qparams(src), out_dir, storage)


_FIELDS = (
    "source",
    "model_type",
    "dtype",
    "recipe",
    "calibration",
    "summary",
    "layers",
    "seconds",
    "peak_rss_mb",
    "tuning",
)


def recorded_fields(manifest: dict[str, Any]) -> dict[str, Any]:
    """The fields of an artifact's manifest that a rewrite keeps: its compression record (and any tuning)."""
    return {k: manifest[k] for k in _FIELDS if k in manifest}


def write_artifact(
    loaded: LoadedModel,
    fields: dict[str, Any],
    qparams: dict[str, dict[str, torch.Tensor]],
    out_dir: str | Path,
    storage: str = DEFAULT_STORAGE,
) -> Path:
    """Write ``loaded`` as an artifact with manifest ``fields`` and grids ``qparams`` (what a recovery that tunes
    the artifact's own values writes; the same writer as :func:`save_artifact`)."""
    return _write(loaded, fields, qparams, out_dir, storage)


def _write(
    loaded: LoadedModel,
    fields: dict[str, Any],
    qparams: dict[str, dict[str, torch.Tensor]],
    out_dir: str | Path,
    storage: str,
) -> Path:
    out, tmp = prepare_target(out_dir, storage)
    try:
        packed, metas = {}, {}
        if storage == "packed":
            names = [r["name"] for r in fields.get("layers") or []]
            packed, metas = pack_model(loaded.model, names, qparams, (fields.get("recipe") or {}).get("bits"))
        state = {k: v for k, v in loaded.model.state_dict().items() if k not in metas} if metas else None
        loaded.model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state)
        return finish_artifact(loaded, fields, qparams, storage, tmp, out, metas, packed)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_target(out_dir: str | Path, storage: str) -> tuple[Path, Path]:
    """(the artifact folder, the empty temporary sibling it is written into) for ``out_dir``; refuses an
    unknown storage and an existing path that is neither empty nor a recoup artifact."""
    if storage not in STORAGES:
        raise RecoupError(unknown_name_message("storage", str(storage), STORAGES))
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not (out.is_dir() and ((out / ARTIFACT_MANIFEST).is_file() or not any(out.iterdir()))):
        raise RecoupError(
            f"'{out}' exists and is not a recoup artifact; refusing to overwrite it (choose another --out)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return out, tmp


def finish_artifact(
    loaded: LoadedModel,
    fields: dict[str, Any],
    qparams: dict[str, dict[str, torch.Tensor]],
    storage: str,
    tmp: Path,
    out: Path,
    metas: dict[str, dict[str, Any]],
    packed: dict[str, torch.Tensor] | None,
) -> Path:
    """Complete the artifact in ``tmp`` (its weights and config already there; ``packed``: the packed tensors to
    write, None when the packed file is written already; ``qparams``: the grids to write, empty when there are none
    or their file is written already), seal its manifest and move it to ``out``."""
    from safetensors.torch import save_file

    loaded.tokenizer.save_pretrained(str(tmp))
    if qparams:
        save_file(grid_tensors(qparams, storage), str(tmp / QPARAMS_FILE))
    if metas:
        if packed is not None:
            save_file(packed, str(tmp / PACKED_FILE), metadata={"format": "recoup-packed"})
        _mark_packed_config(tmp / "config.json")
    listed = [f for f in sorted(tmp.iterdir()) if f.is_file()]
    encodings = Counter(m["encoding"] for m in metas.values())
    storage_info: dict[str, Any] = {
        "kind": "packed" if metas else "dense",
        "bytes": sum(f.stat().st_size for f in listed),
        "file_bytes": {f.name: f.stat().st_size for f in listed},
        "packed_linears": dict(encodings),
        "dense_linears": len(fields.get("layers") or []) - len(metas),
    }
    if metas:
        storage_info.update({"file": PACKED_FILE, "tensors": metas})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if metas else 1,
        **fields,
        "versions": _versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "files": {f.name: file_sha256(f) for f in listed},
        "storage": storage_info,
    }
    (tmp / ARTIFACT_MANIFEST).write_text(dumps(seal_manifest(manifest), indent=1))
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    if metas:
        log.info(
            "packed %d of %d linears (%s); %d stay dense",
            len(metas),
            len(fields.get("layers") or []),
            ", ".join(f"{k} {v}" for k, v in sorted(encodings.items())),
            storage_info["dense_linears"],
        )
    log.info("wrote artifact %s (%s, %.1f MB on disk)", out, storage_info["kind"], storage_info["bytes"] / 1e6)
    return out


MANIFEST_DIGEST = "manifest_sha256"


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no whitespace, NaN as null), the digest field
    and the in-memory ``artifact_dir`` left out: it covers the recipe, per-layer records, summary and the
    list of file hashes, so an edited sparsity, bits or layer list no longer matches."""
    body = {k: v for k, v in manifest.items() if k not in (MANIFEST_DIGEST, "artifact_dir")}
    canonical = json.dumps(json.loads(dumps(body)), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def seal_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` with its own digest (:func:`manifest_digest`) added as ``manifest_sha256``."""
    return {**manifest, MANIFEST_DIGEST: manifest_digest(manifest)}


def read_manifest(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of the artifact at ``path``; its own digest is always checked, with ``verify`` also the
    sha256 of every listed file. A manifest without a digest (written before recoup sealed manifests)
    still loads: its files are verified, its recorded fields cannot be, and a warning says so."""
    path = Path(path)
    try:
        manifest = json.loads((path / ARTIFACT_MANIFEST).read_text())
    except FileNotFoundError:
        raise RecoupError(f"'{path}' is not a recoup artifact (no {ARTIFACT_MANIFEST})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RecoupError(f"'{path}/{ARTIFACT_MANIFEST}' is not valid JSON; the artifact is corrupted") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RecoupError(f"'{path}/{ARTIFACT_MANIFEST}' is not a recoup compressed-model manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise RecoupError(
            f"artifact format {manifest['format_version']} is newer than this recoup reads ({FORMAT_VERSION})"
        )
    if MANIFEST_DIGEST in manifest:  # cheap: always checked
        if manifest[MANIFEST_DIGEST] != manifest_digest(manifest):
            raise RecoupError(
                f"artifact '{path}': {ARTIFACT_MANIFEST} was edited after recoup wrote it (its "
                f"{MANIFEST_DIGEST} does not match); recompress, or restore the original file"
            )
    elif verify:
        log.warning(
            "artifact '%s': %s has no %s (an older recoup wrote it); its files are verified, its "
            "recorded sparsity/bits/layers are not",
            path,
            ARTIFACT_MANIFEST,
            MANIFEST_DIGEST,
        )
    if verify:
        listing = manifest.get("files", {})
        if not isinstance(listing, dict) or not listing:
            raise RecoupError(f"artifact '{path}': {ARTIFACT_MANIFEST} lists no files; the artifact is corrupted")
        for name, digest in listing.items():
            f = member(path, name, f"artifact '{path}': {ARTIFACT_MANIFEST}")
            if not f.is_file():
                raise RecoupError(f"artifact '{path}' is incomplete: {name} is missing")
            if file_sha256(f) != digest:
                raise RecoupError(
                    f"artifact '{path}' is corrupted: {name} does not match its sha256 in {ARTIFACT_MANIFEST}"
                )
    return manifest


def load_qparams(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """{linear name: {scale, zero, g_idx}} of an artifact (empty if nothing was quantized)."""
    from safetensors.torch import load_file

    f = Path(path) / QPARAMS_FILE
    if not f.is_file():
        return {}
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(f)).items():
        name, kind = key.rsplit(".", 1)
        if kind == "zero" and t.dtype == torch.uint8:  # packed artifacts store integer zero points as uint8
            t = t.float()
        out.setdefault(name, {})[kind] = t
    return out


def load_artifact(path: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu") -> LoadedModel:
    """Load a compressed artifact (verified against its manifest) as a :class:`LoadedModel` with ``.manifest``.

    The in-memory manifest gains ``artifact_dir`` (not stored in the file) so that
    :func:`recoup.artifact.fingerprint.compression_fingerprint` can find the quantization grids.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser().resolve()
    manifest = read_manifest(path)
    metas, packed = packed_tensors(path, manifest)
    try:
        config = artifact_config(path)
        tokenizer = AutoTokenizer.from_pretrained(str(path), **({"config": config} if config is not None else {}))
        with _quiet_missing_weights() if metas else nullcontext():
            model, info = AutoModelForCausalLM.from_pretrained(
                str(path),
                config=config,
                dtype=parse_dtype(dtype),
                use_safetensors=True,
                trust_remote_code=False,
                output_loading_info=True,
            )
    except (OSError, ValueError, KeyError) as exc:
        raise RecoupError(f"could not load artifact '{path}': {str(exc).splitlines()[0]}") from None
    if set(info["missing_keys"]) != set(metas):  # else transformers would fill them with random weights
        raise RecoupError(
            f"artifact '{path}': the weights missing from model.safetensors are not the packed ones; "
            "the artifact is corrupted"
        )
    if metas:  # read and decoded one linear at a time: no second copy of the packed weights in memory
        unpack_into(model, metas, TensorFile(packed), load_qparams(path))
    check_finite(model.state_dict().items(), f"artifact '{path}'")
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    manifest["artifact_dir"] = str(path)
    return LoadedModel(model=model, tokenizer=tokenizer, source=str(path), path=path, manifest=manifest)


def packed_tensors(path: Path, manifest: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], Path | None]:
    """({parameter name: meta} of the artifact's packed linears, the packed file; None when nothing is packed),
    the file's name checked like every listed file before any weight is read."""
    storage = manifest.get("storage") or {}
    metas = storage.get("tensors") if storage.get("kind") == "packed" else {}
    if not isinstance(metas, dict):
        raise RecoupError(
            f"'{path}/{ARTIFACT_MANIFEST}' says packed storage but lists no packed tensors; the artifact is corrupted"
        )
    if not metas:
        return {}, None
    return metas, member(path, storage.get("file", PACKED_FILE), f"artifact '{path}': {ARTIFACT_MANIFEST}")


def _mark_packed_config(config_file: Path) -> None:
    """Give ``config.json`` the model type :data:`PACKED_MODEL_TYPE` (real one kept aside), so plain
    transformers refuses the directory with a message naming ``recoup export``."""
    raw = json.loads(config_file.read_text())
    raw[REAL_MODEL_TYPE_KEY] = raw["model_type"]
    raw["model_type"] = PACKED_MODEL_TYPE
    config_file.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def artifact_config(path: Path):
    """The transformers config of the artifact at ``path``, with a packed artifact's real model type
    restored (older artifacts and dense ones have it in place: None lets transformers read it)."""
    from transformers import CONFIG_MAPPING

    raw = json.loads((path / "config.json").read_text())
    if REAL_MODEL_TYPE_KEY not in raw:
        return None
    raw["model_type"] = real = raw.pop(REAL_MODEL_TYPE_KEY)
    if real not in CONFIG_MAPPING:
        raise RecoupError(f"artifact '{path}' holds a '{real}' model, which this transformers does not know")
    return CONFIG_MAPPING[real].from_dict(raw)


def grid_tensors(qparams: dict[str, dict[str, torch.Tensor]], storage: str) -> dict[str, torch.Tensor]:
    """The tensors of the grids file for ``qparams``: ``<linear>.<scale|zero|g_idx>`` (a packed artifact's zero
    points as uint8 where that is exact)."""
    return {
        f"{name}.{k}": (_small_zero(v) if storage == "packed" and k == "zero" else v).contiguous()
        for name, d in qparams.items()
        for k, v in d.items()
    }


def _small_zero(zero: torch.Tensor) -> torch.Tensor:
    """Zero points (integer codes of 0.0, float32) as uint8 when that is exact (always, for 1-8 bits)."""
    small = zero.to(torch.uint8)
    return small if torch.equal(small.float(), zero.float()) else zero


@contextmanager
def _quiet_missing_weights():
    """transformers warns that packed weights are missing from model.safetensors (they are decoded next);
    at that level it also runs a tensor-parallel check that warns, hence the second logger."""
    loggers = [logging.getLogger(f"transformers.{n}") for n in ("modeling_utils", "distributed.tensor_parallel")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
