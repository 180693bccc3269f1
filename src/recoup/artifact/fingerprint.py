"""Whether an artifact's compression is intact: per compressed linear, its zero count, a hash of its zero mask and,
when quantized, of its integer codes and its largest distance from the recorded grid; one digest over them all.
A recovery that must leave the compressed weights alone (LoRA, prompts, tuning the scales) compares the digest
before and after, and records it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from recoup.artifact.grid import grid_deviation
from recoup.artifact.store import load_qparams
from recoup.errors import RecoupError
from recoup.model.anatomy import anatomy


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()


@torch.no_grad()
def compression_fingerprint(
    model: nn.Module, manifest: dict[str, Any] | None = None, qparams: dict[str, dict[str, torch.Tensor]] | None = None
) -> dict[str, Any]:
    """Whether a model's compression is intact: per targeted linear, the zero count, a sha256 of the
    zero mask, and (for quantized linears) the largest distance from the recorded grid in grid steps
    and a sha256 of the integer codes. Compare the result before and after training a recovery:
    equal ``digest`` means no mask bit and no quantized code changed.

    manifest: an artifact manifest (``LoadedModel.manifest``) or ``CompressReport.to_dict()``; its
    ``layers`` name the linears (default: every linear in the anatomy). qparams: the grids (default:
    read from the manifest's ``artifact_dir``).
    """
    manifest = manifest or {}
    if qparams is None:
        qparams = load_qparams(manifest["artifact_dir"]) if manifest.get("artifact_dir") else {}
    anat = anatomy(model)
    names = fingerprinted_linears(manifest) or [n for n, _ in anat.iter_linears()]
    bits = (manifest.get("recipe") or manifest.get("config") or {}).get("bits")
    modules = dict(model.named_modules())
    out: dict[str, Any] = {}
    for name in names:
        if name not in modules:
            raise RecoupError(f"the model has no linear '{name}' named in the manifest; is it the right model?")
        mod = modules[name]
        mod = getattr(mod, "base_layer", mod)  # a PEFT-wrapped linear: fingerprint the frozen base weight
        out[name] = linear_fingerprint(anat.weight_matrix(mod), qparams.get(name), bits)
    return fingerprint_summary(out)


def fingerprinted_linears(manifest: dict[str, Any]) -> list[str]:
    """The linears a manifest (or a report's dict) names, in order; empty when it names none."""
    layers = manifest.get("layers") or manifest.get("linears")
    return [r["name"] for r in layers] if layers else []


@torch.no_grad()
def linear_fingerprint(weight: torch.Tensor, q: dict[str, torch.Tensor] | None, bits: int | None) -> dict[str, Any]:
    """One linear's entry of :func:`compression_fingerprint` (weight (rows, cols); ``q`` its grid, if quantized)."""
    w = weight.detach().float()
    mask = w == 0
    entry: dict[str, Any] = {"zeros": int(torch.count_nonzero(mask)), "numel": w.numel(), "mask_sha256": _sha(mask)}
    if q is not None and bits:
        dev = grid_deviation(w, q["scale"], q["zero"], q["g_idx"], 2**bits - 1)
        g = q["g_idx"].long()
        codes = torch.round(w / q["scale"].float()[:, g] + q["zero"].float()[:, g]).to(torch.int16)
        entry.update({"grid_deviation": dev, "on_grid": dev < 1e-2, "codes_sha256": _sha(codes)})
    return entry


def fingerprint_summary(entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """:func:`compression_fingerprint` of per-linear entries (:func:`linear_fingerprint`), e.g. gathered one
    layer at a time: the digest over every mask and code hash, the sparsity, whether all are on their grid."""
    total = sum(e["numel"] for e in entries.values())
    zeros = sum(e["zeros"] for e in entries.values())
    grids = [e["on_grid"] for e in entries.values() if "on_grid" in e]
    digest = hashlib.sha256(
        json.dumps({n: [e["mask_sha256"], e.get("codes_sha256")] for n, e in entries.items()}, sort_keys=True).encode()
    ).hexdigest()
    return {
        "linears": entries,
        "sparsity": zeros / total if total else 0.0,
        "all_on_grid": all(grids) if grids else None,
        "digest": digest,
    }
