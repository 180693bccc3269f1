"""Recovery inside the artifact: train its quantization scales, its normalisation gains or the kept weights of its
sparse linears, with every integer code and every mask bit frozen; the result is a new artifact of the same format.

``--trainable`` is a comma list of:

- ``scales``: each quantized linear's per-group scales, the integer codes ``q`` and the zero points frozen; the
  weight is recomputed every forward as ``scale[:, g_idx] * (q - zero[:, g_idx])`` (PEQA, Kim et al. 2023;
  EfficientQAT's end-to-end step-size training, Chen et al. 2024, which also trains the step sizes alone). A scale
  trains as ``s0 * r`` with the factor ``r`` (init 1) the trained parameter, so one learning rate moves every group
  by the same relative amount whatever its range. Zero points stay frozen: they are the integer codes of 0.0,
  which keep a pruned weight exactly zero and export as integers (compressed-tensors, GGUF Q4_1). A grid of
  float16 scales (``--scale-dtype float16``) gets its tuned scales rounded to float16 again, so the artifact still
  exports to GGUF Q4_0 / Q8_0 exactly. A linear whose weight is not exactly on its recorded grid stays frozen;
- ``weights``: the kept weights of each sparse, unquantized linear, the gradient masked so pruned weights stay
  exactly zero (sparse fine-tuning with a frozen mask, as in Kurtic et al. 2023);
- ``norms``: the normalisation layers' gains (and a LayerNorm's bias).

``weights`` on a quantized artifact would move weights off their codes and is refused before the model loads, as
are ``scales`` on an unquantized one and any source that is not a recoup artifact. The objective is any trained
method's (``lm``, ``kd``, ``squarehead`` and their sums; the teacher is the dense source the manifest records).

The new artifact is written by the artifact store's own writer in the source's storage (packed codes and
bitmasks, or dense), with the source's compression record (recipe, calibration, per-layer records) and a
``tuning`` list in its manifest saying what was tuned, on what data, with which objective and teacher, starting
from which artifact. Its codes and masks are bit-identical to the source's: the compression fingerprint
(:func:`recoup.artifact.fingerprint.compression_fingerprint`, codes under the new scales) is checked before writing, and
a mismatch refuses to save. It adds no parameter and no compute at inference; ``recoup eval`` and ``recoup
export`` take it like any artifact.

``--blockwise-steps N`` (default 0, off) first fits each decoder layer's share of those parameters for N steps to
reproduce the dense layer's output, one layer at a time (:mod:`recoup.recover.blockwise`: the compressed model's
own stream in, the dense layer's output on the dense stream as the target, SquareHead-normalised MSE), then trains
end to end (``--steps 0``: block-wise alone). Its calibration windows are the ones the compression used, rebuilt
from the manifest's calibration record (corpus, nsamples, seqlen, seed, BOS): memory is then what compression
needed (two activation buffers of nsamples x seqlen x hidden, one layer training at a time), no new knob, and the
end-to-end loop's own data stays separate; an artifact compressed without calibration data is refused.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from recoup.config import check
from recoup.errors import RecoupError
from recoup.model.anatomy import anatomy
from recoup.model.recovery import Recovery
from recoup.recover.base import RecoveryMethod
from recoup.recover.train import FitConfig, TrainResult, teacher_source

log = logging.getLogger(__name__)

TRAINABLE = ("scales", "norms", "weights")


def trainable_parts(value: str) -> tuple[str, ...]:
    """The parts of a ``--trainable`` comma list, in :data:`TRAINABLE` order; one clear line for anything else."""
    parts = [p.strip() for p in str(value).split(",") if p.strip()]
    bad = [p for p in parts if p not in TRAINABLE]
    if not parts or bad:
        raise RecoupError(f"--trainable takes a comma list of {', '.join(TRAINABLE)} (got '{value}')")
    return tuple(t for t in TRAINABLE if t in parts)


@dataclasses.dataclass
class TuneConfig(FitConfig):
    """``recoup recover ARTIFACT --method tune --trainable scales,norms --out NEW_ARTIFACT``: what trains inside the
    artifact, and the shared training keys (defaults: ptb windows of 256 tokens, batch 4, 100 steps, lr 2e-4,
    validation every steps/5)."""

    trainable: str = "scales"  # comma list: scales (quantized linears) | weights (sparse unquantized) | norms
    batch_size: int = 4
    steps: int = 100
    lr: float = 2e-4
    eval_every: int | None = None
    blockwise_steps: int = 0  # steps per decoder layer of block-wise reconstruction before end to end; 0: off

    default_data: ClassVar[str | None] = "ptb"

    def __post_init__(self) -> None:
        check(self.blockwise_steps >= 0, f"blockwise_steps must be >= 0 (got {self.blockwise_steps}; 0: off)")
        check(
            self.steps >= 1 or (self.steps == 0 and self.blockwise_steps > 0),
            f"steps must be >= 1 (got {self.steps}; 0 only with --blockwise-steps N: block-wise alone)",
        )
        super().__post_init__()
        self.trainable = ",".join(trainable_parts(self.trainable))

    def train_config(self):
        """The end-to-end loop's config; None when it is off (``steps`` 0, block-wise reconstruction alone)."""
        if self.steps == 0:
            dataclasses.replace(self, steps=1).train_config()  # the other keys still checked
            return None
        return super().train_config()

    def parts(self) -> tuple[str, ...]:
        return trainable_parts(self.trainable)

    def check_job(self, model: str, out: str | None) -> None:
        """Refuse, from the manifest alone (before the model loads), a source that is not an artifact, a choice
        that would change its codes or mask, and an ``out`` that is the source itself."""
        from recoup.artifact.store import read_manifest
        from recoup.model.load import resolve_source

        kind, path = resolve_source(model)
        check(
            kind == "artifact",
            f"tune trains inside a recoup artifact; '{model}' is not one (compress it first with `recoup compress`)",
        )
        if out is not None:
            check(
                Path(out).expanduser().resolve() != Path(path).resolve(),
                "--out is the source artifact; write the tuned artifact to another directory",
            )
        manifest = read_manifest(path, verify=False)
        refuse_parts(manifest, self.parts(), model)
        if self.blockwise_steps:
            calibration_of(manifest, model)


def calibration_of(manifest: dict, where: str) -> dict:
    """The compression's calibration record (block-wise reconstruction rebuilds its windows); one line without."""
    cal = manifest.get("calibration") or {}
    if not all(cal.get(k) for k in ("corpus", "nsamples", "seqlen")):
        raise RecoupError(
            f"--blockwise-steps fits on the compression's calibration windows, and '{where}' records none "
            f"(compressed without calibration data); leave --blockwise-steps out"
        )
    return cal


def refuse_parts(manifest: dict, parts: tuple[str, ...], where: str) -> None:
    """One line when ``parts`` cannot be tuned on the artifact of ``manifest`` without changing its codes or
    mask, or would tune nothing."""
    bits = (manifest.get("recipe") or {}).get("bits")
    if "weights" in parts and bits:
        raise RecoupError(
            f"--trainable weights would move the {bits}-bit weights of '{where}' off their integer "
            f"codes; tune a quantized artifact's scales (--trainable scales) and/or norms"
        )
    if "scales" in parts and not bits:
        raise RecoupError(
            f"'{where}' is not quantized: it has no scales to tune; use --trainable weights (its "
            f"kept weights, mask frozen) and/or norms"
        )


class _Dequant(nn.Module):
    """The weight of a quantized linear from its frozen codes and trainable scales: ``(s0 * r)[:, g] * (q - z[:, g])``
    in float32, cast to the model's dtype (transposed for a Conv1D layout)."""

    def __init__(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        g_idx: torch.Tensor,
        dtype: torch.dtype,
        transpose: bool,
    ) -> None:
        super().__init__()
        self.register_buffer("codes", codes)  # uint8 (rows, cols)
        self.register_buffer("s0", scale.float())
        self.register_buffer("zero", zero.float())
        self.register_buffer("g_idx", g_idx.long())
        self.ratio = nn.Parameter(torch.ones_like(self.s0))
        self.dtype, self.transpose = dtype, transpose

    def scale(self) -> torch.Tensor:
        return self.s0 * self.ratio

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        g = self.g_idx
        w = self.scale().index_select(1, g) * (self.codes.float() - self.zero.index_select(1, g))
        w = w.to(self.dtype)
        return w.t() if self.transpose else w


def norm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The normalisation layers of ``model`` (RMSNorm / LayerNorm of any architecture) that have parameters."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if (isinstance(m, nn.LayerNorm) or "Norm" in type(m).__name__)
        and any(True for _ in m.parameters(recurse=False))
    ]


class TunedArtifact(Recovery):
    """A tuned copy of an artifact, held in memory until :meth:`save` writes it as a new artifact. It adds no
    parameter at inference (``num_parameters`` 0); ``meta["trained_parameters"]`` counts what trained."""

    method = "tune"

    def __init__(self, loaded, fields: dict, qparams: dict, storage: str, before: dict, meta: dict) -> None:
        self.loaded, self.fields, self.qparams, self.storage = loaded, fields, qparams, storage
        self.before = before
        self.meta = meta

    def num_parameters(self) -> int:
        return 0

    def describe(self) -> dict:
        return {"method": self.method, "parameters": 0, **self.meta}

    def fingerprint(self) -> dict:
        from recoup.artifact.fingerprint import compression_fingerprint

        return compression_fingerprint(self.loaded.model, self.fields, self.qparams)

    def save(self, path: str | Path) -> None:
        """Write the new artifact to ``path`` (the store's writer, the source's storage); refused when its codes or
        masks differ from the source's."""
        from recoup.artifact.store import write_artifact

        after = self.fingerprint()
        if after["digest"] != self.before["digest"]:
            changed = [
                n
                for n, e in after["linears"].items()
                if (e["mask_sha256"], e.get("codes_sha256"))
                != (self.before["linears"][n]["mask_sha256"], self.before["linears"][n].get("codes_sha256"))
            ]
            raise RecoupError(
                f"refusing to save: tuning changed the codes or mask of {len(changed)} linears "
                f"(e.g. {changed[:1]}); the source artifact is untouched"
            )
        write_artifact(self.loaded, self.fields, self.qparams, path, self.storage)

    @classmethod
    def load(cls, path: str | Path) -> "TunedArtifact":
        raise RecoupError(
            f"'{path}' is a tuned artifact, not a recovery to attach; use it as the model "
            f"(`recoup eval {path}`, `recoup export {path} ...`)"
        )


def _on_grid(w: torch.Tensor, q: dict, bits: int, dtype: torch.dtype) -> torch.Tensor | None:
    """The uint8 codes (rows, cols) of weight ``w`` (rows, cols) when it is exactly its grid's value in the
    artifact's ``dtype``, else None."""
    from recoup.artifact.packing import dequantize, grid_codes

    codes = grid_codes(w, q["scale"], q["zero"], q["g_idx"], 2**bits - 1)
    if codes is None:
        return None
    exact = dequantize(codes, q["scale"], q["zero"], q["g_idx"]).to(dtype).to(w.dtype)
    return codes if torch.equal(exact, w) else None


def fit_tune(loaded, config: TuneConfig, data) -> tuple[TunedArtifact, TrainResult]:
    """Tune ``config.trainable`` inside the artifact ``loaded`` (in place); returns the tuned artifact, unsaved."""
    from recoup.artifact.fingerprint import compression_fingerprint
    from recoup.artifact.packing import dequantize
    from recoup.artifact.store import load_qparams, recorded_fields
    from recoup.model.load import parse_dtype
    from recoup.recover.blockwise import reconstruct
    from recoup.recover.losses import mean_loss
    from recoup.recover.task_data import pad_id_of, training_data
    from recoup.recover.train import train

    manifest = loaded.manifest
    if not manifest or not manifest.get("artifact_dir"):
        raise RecoupError(f"tune trains inside a recoup artifact; '{loaded.source}' is not one")
    parts = config.parts()
    refuse_parts(manifest, parts, loaded.source)
    data = training_data(loaded.tokenizer, config) if data is None else data
    model, tok = loaded.model, loaded.tokenizer
    ana = anatomy(model)
    art_dtype = parse_dtype(manifest.get("dtype") or "float32")
    qparams = load_qparams(manifest["artifact_dir"])
    bits = (manifest.get("recipe") or {}).get("bits")
    scale_dtype = (manifest.get("recipe") or {}).get("scale_dtype", "float32")
    before = compression_fingerprint(model, manifest, qparams)
    cal = calibration_of(manifest, loaded.source) if config.blockwise_steps else None  # before the teacher loads
    objective = config.objective_loss(loaded)
    modules = dict(model.named_modules())
    names = [r["name"] for r in manifest.get("layers") or []]
    dtype = next(model.parameters()).dtype
    if dtype not in (art_dtype, torch.float32):  # every other tensor is written back as loaded
        art = str(art_dtype).replace("torch.", "")
        wider = art if art == "float32" else f"{art} or float32"
        raise RecoupError(
            f"tune writes a new {art} artifact from the model as loaded ({str(dtype)[6:]}), which would "
            f"round its untouched weights; load it with --dtype {wider}"
        )

    for p in model.parameters():
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    dequants: dict[str, _Dequant] = {}
    masked: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}
    hooks, off_grid = [], []
    if "scales" in parts:
        for name in names:
            q = qparams.get(name)
            if q is None:
                continue
            mod = modules[name]
            w = ana.weight_matrix(mod).detach()
            codes = _on_grid(w.cpu(), q, bits, art_dtype)
            if codes is None:
                off_grid.append(name)
                continue
            dq = _Dequant(codes, q["scale"], q["zero"], q["g_idx"], dtype, ana.spec.conv1d).to(w.device)
            parametrize.register_parametrization(mod, "weight", dq, unsafe=True)
            dequants[name] = dq
            params.append(dq.ratio)
    if "weights" in parts:
        for name in names:
            if name in qparams:
                continue
            p = modules[name].weight
            mask = (p != 0).to(p.dtype)
            p.requires_grad_(True)
            hooks.append(p.register_hook(lambda g, m=mask: g * m.to(g.dtype)))
            masked[name] = (p, mask)
            params.append(p)
    norms = norm_modules(model) if "norms" in parts else []
    for _, m in norms:
        for p in m.parameters(recurse=False):
            p.requires_grad_(True)
            params.append(p)
    if not params:
        raise RecoupError(f"nothing to tune in '{loaded.source}' with --trainable {config.trainable}")
    trained = int(sum(p.numel() for p in params))
    log.info(
        "tune: %d scale groups of %d linears, %d sparse linears, %d norms (%d parameters)",
        sum(d.ratio.numel() for d in dequants.values()),
        len(dequants),
        len(masked),
        len(norms),
        trained,
    )

    pad = pad_id_of(tok)
    device = next(model.parameters()).device
    validate = (lambda: mean_loss(model, data.valid, pad, config.batch_size)) if data.valid else None
    base_val = validate() if validate is not None else None
    blockwise = None
    try:
        if cal is not None:
            blockwise = reconstruct(loaded, config, objective.teacher, params, cal)
            blockwise["val_loss_after"] = validate() if validate is not None else None
        cfg = config.train_config()
        if cfg is None:  # block-wise alone: the state it left, validated once
            v = blockwise["val_loss_after"]
            result = TrainResult(0, 0.0, [], [(0, v)] if v is not None else [], v, 0 if v is not None else None, 0)
        else:
            result = train(
                params,
                data.batches(config.batch_size, pad, config.seed),
                lambda b: objective(model, b, device),
                cfg,
                validate,
                tokens_in=lambda b: b.tokens,
                desc="tune",
            )
    finally:
        for h in hooks:
            h.remove()

    with torch.no_grad():
        for name, dq in dequants.items():  # the tuned scales, then each weight exactly as the store decodes it
            scale = dq.scale().detach().cpu()
            if scale_dtype == "float16":
                scale = scale.to(torch.float16).float().clamp_min(2.0**-24)
            q = qparams[name]
            qparams[name] = {**q, "scale": scale.to(q["scale"].dtype)}
            w = dequantize(dq.codes.cpu(), qparams[name]["scale"], q["zero"], q["g_idx"]).to(art_dtype)
            mod = modules[name]
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
            mod.weight.data = (w.t() if ana.spec.conv1d else w).to(mod.weight.device).contiguous()
        for p, _ in masked.values():
            p.data = p.data.to(art_dtype)
        for _, m in norms:
            for p in m.parameters(recurse=False):
                p.data = p.data.to(art_dtype)
        model.to(art_dtype)
    for p in params:
        p.requires_grad_(False)
    model.eval()

    after = compression_fingerprint(model, manifest, qparams)
    record = {
        "method": "tune",
        "trainable": list(parts),
        "trained_parameters": trained,
        "tuned": {"scales": len(dequants), "weights": len(masked), "norms": len(norms)},
        "frozen_off_grid": off_grid,
        "zero_points": "frozen",
        "objective": config.objective,
        "teacher": teacher_source(loaded, config.teacher) if config.objective != "lm" else None,
        "data": data.protocol,
        "config": config.to_dict(),
        "train": {
            "steps": result.steps,
            "seconds": round(result.seconds, 1),
            "best_val_loss": result.best_val_loss,
            "best_step": result.best_step,
            "val_loss_before": base_val,
            "val_ppl_before": math.exp(min(base_val, 50)) if base_val is not None else None,
            "tokens": result.tokens,
        },
        "source_artifact": {"path": manifest["artifact_dir"], "manifest_sha256": manifest.get("manifest_sha256")},
        "compression_fingerprint": {"digest": before["digest"], "unchanged": after["digest"] == before["digest"]},
        "blockwise": blockwise,
    }
    fields = recorded_fields(manifest)
    fields["tuning"] = list(manifest.get("tuning") or []) + [record]
    storage = "packed" if (manifest.get("storage") or {}).get("kind") == "packed" else "dense"
    meta = {**record, "train": {**record["train"], "val_loss_without_prompt": base_val}}
    return TunedArtifact(loaded, fields, qparams, storage, before, meta), result


METHOD = RecoveryMethod(
    "tune",
    "tune the artifact's own scales / sparse weights / norms, codes and masks frozen: a "
    "new artifact, 0 extra parameters (PEQA; Kurtic et al. 2023)",
    TuneConfig,
    fit_tune,
    TunedArtifact.load,
)
