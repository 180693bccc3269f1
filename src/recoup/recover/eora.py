"""EoRA: training-free low-rank compensation of a compressed model in the eigenspace of its inputs.

EoRA (Liu et al. 2024, arXiv 2410.21271). For each compressed linear with dense weight W and compressed
weight W_c (both (out, in)), the error dW = W - W_c is compensated by B A (B: (out, r), A: (r, in))
minimising ||(dW - B A) X^T||_F over the layer's calibration inputs X (N, in). With
X^T X = Q diag(l) Q^T (damped), the rank-r SVD of dW Q diag(sqrt(l)) = U S V^T gives
B = U_r sqrt(S_r) and A = sqrt(S_r) V_r^T diag(1/sqrt(l)) Q^T; at full rank B A = dW exactly.

Layers are streamed by :class:`recoup.model.streamer.LayerStreamer` (the compression engine's too): the
first decoder layer's inputs are captured once, then for each layer X^T X is accumulated (once per distinct
linear input: the linears of one sequential group read the same tensor), the compensation computed, and the
layer's outputs *with* its compensation propagated to the next layer. Memory: one layer's activations
(nsamples, seqlen, hidden) plus its statistics; only the dense source's weights are read (the dense model is
never run).

The result is an unmerged PEFT LoRA (scaling 1: ``lora_alpha = r``), so the compressed base stays
bit-identical (its compression fingerprint is checked) and ``peft.PeftModel.from_pretrained`` loads it.
With ``energy`` set, each linear gets the smallest rank whose singular values S keep at least that share of
||dW Q diag(sqrt(l))||_F^2 (sum of S^2), capped by ``rank``; the per-layer ranks are saved as PEFT's
``rank_pattern`` (with ``alpha_pattern`` = the rank, so every layer keeps scaling 1).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from recoup.config import Config, check
from recoup.errors import RecoupError
from recoup.model.anatomy import Anatomy, _get, anatomy
from recoup.model.lazy import LazyWeights
from recoup.model.streamer import LayerStreamer, hooked
from recoup.recover.adapter import LoraConfig, LoraRecovery
from recoup.recover.base import RecoveryMethod, base_of, compression_digest, record_base, record_intact
from recoup.recover.train import load_teacher, teacher_source

log = logging.getLogger(__name__)


def kept_rank(s: torch.Tensor, rank: int, energy: float | None) -> int:
    """The rank EoRA keeps for singular values ``s`` (descending, (k,)): ``min(rank, k)`` without ``energy``;
    with it, the smallest r whose ``sum(s[:r]^2)`` is >= ``energy`` of ``sum(s^2)`` (all of them at 1.0),
    capped by ``rank``; at least 1."""
    n = s.numel()
    if energy is None or energy >= 1.0:
        return max(1, min(rank, n))
    cum = (s.double() ** 2).cumsum(0)
    need = int((cum < energy * cum[-1]).sum()) + 1 if float(cum[-1]) > 0 else 1
    return max(1, min(rank, n, need))


def eigen_compensation(
    dw: torch.Tensor, xtx: torch.Tensor, rank: int, damp: float = 0.01, energy: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """EoRA's factors of one linear: (B (out, r), A (r, in), kept) with B A ~ dW in the input eigenspace.

    dw: W_dense - W_compressed, (out, in); xtx: sum of x^T x over the calibration inputs, (in, in);
    damp: added to the eigenvalues as a fraction of their mean (keeps 1/sqrt(l) finite). Without ``energy``,
    r = ``rank`` and ranks above min(out, in) are zero-padded; with it, r = :func:`kept_rank` (no padding).
    kept: the share of the projected error's squared Frobenius norm the r components hold (1.0 for dW = 0).
    Computed in float64, returned in float32.
    """
    out_f, in_f = dw.shape
    h = xtx.double() if xtx.dtype != torch.float64 else xtx.clone()
    # the damping added to the diagonal in place: H + c I value for value, without two more (in, in) float64
    # matrices (an 8B down_proj's is 1.6 GB)
    h.diagonal().add_(damp * h.diagonal().mean().clamp(min=1e-12))
    lam, q = torch.linalg.eigh(h)
    sq = lam.clamp(min=1e-12).sqrt()
    u, s, vh = torch.linalg.svd(dw.double() @ q * sq, full_matrices=False)
    k = kept_rank(s, rank, energy)
    width = rank if energy is None else k
    total = float(s.pow(2).sum())
    kept = float(s[:k].pow(2).sum()) / total if total > 0 else 1.0
    root = s[:k].sqrt()
    b = torch.zeros(out_f, width, dtype=torch.float64, device=dw.device)
    a = torch.zeros(width, in_f, dtype=torch.float64, device=dw.device)
    b[:, :k] = u[:, :k] * root
    a[:k] = (root[:, None] * vh[:k] / sq) @ q.T
    return b.float(), a.float(), kept


def _peft_key(name: str, part: str) -> str:
    return f"base_model.model.{name}.{part}.weight"


def compensate(
    model: nn.Module,
    dense: nn.Module,
    ids: torch.Tensor,
    rank: int,
    targets: list[str],
    batch_size: int = 8,
    damp: float = 0.01,
    energy: float | None = None,
    kept: dict[str, float] | None = None,
    *,
    weights: LazyWeights | None = None,
    dense_weights: LazyWeights | None = None,
    on_layer: Callable[[int, nn.Module], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Stream ``model`` (compressed, left unchanged) layer by layer on calibration ids (N, T) and return the
    EoRA compensation of every linear whose leaf name is in ``targets`` as a PEFT LoRA state dict
    (``lora_A`` (r, in), ``lora_B`` (out, r), scaling 1; r = ``rank``, or per linear by ``energy``, see
    :func:`eigen_compensation`). ``dense``: the same architecture with the dense weights (only its weights
    are read). ``kept``, if given, is filled with each linear's kept energy share, keyed by module name.

    ``weights`` / ``dense_weights``: lazy weights of ``model`` / ``dense`` (skeletons, :mod:`recoup.model.lazy`):
    each decoder layer of both is read when reached and freed after, so memory holds one layer of each, not two
    models. ``on_layer(i, layer)`` is called with the compressed layer ``i`` in memory (e.g. to fingerprint it)."""
    anat, dense_anat = anatomy(model), anatomy(dense)
    if len(dense_anat.layers) != len(anat.layers) or dense_anat.hidden_size != anat.hidden_size:
        raise RecoupError("the dense source does not have the compressed model's shape (another model?)")
    names = [n for n in anat.linear_names() if n.split(".")[-1] in targets]
    groups = [tuple(n for n in g if n in names) for g in anat.spec.sequential]
    groups = [g for g in groups if g]
    streamer = LayerStreamer(model, anat, weights=weights)
    state: dict[str, torch.Tensor] = {}
    try:
        streamer.capture(ids, batch_size)
        for i in tqdm(range(streamer.num_layers), desc="eora", unit="layer"):
            with streamer.layer(i) as layer:
                if dense_weights is not None:
                    dense_weights.load(dense_anat.layers[i])
                try:
                    _compensate_layer(
                        i, streamer, layer, dense_anat, groups, rank, batch_size, damp, energy, state, kept
                    )
                finally:
                    if dense_weights is not None:
                        dense_weights.free(dense_anat.layers[i])
                if on_layer is not None:
                    on_layer(i, layer)
    finally:
        streamer.close()
    return state


def _compensate_layer(
    i: int,
    streamer: LayerStreamer,
    layer: nn.Module,
    dense_anat: Anatomy,
    groups: list[tuple[str, ...]],
    rank: int,
    batch_size: int,
    damp: float,
    energy: float | None,
    state: dict[str, torch.Tensor],
    kept: dict[str, float] | None,
) -> None:
    """EoRA of decoder layer ``i``: its inputs' X^T X per group, each linear's factors into ``state``, then the
    layer's outputs *with* the compensation propagated."""
    anat, dense_layer = streamer.anat, dense_anat.layers[i]
    stats = {g[0]: torch.zeros(0) for g in groups}

    def observer(key: str):
        def hook(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # float32 sums, as GPTQ's
            stats[key] = x.T @ x if stats[key].numel() == 0 else stats[key] + x.T @ x

        return hook

    with torch.no_grad(), hooked(*[_get(layer, g[0]).register_forward_pre_hook(observer(g[0])) for g in groups]):
        streamer.run(i, batch_size)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for g in groups:
        for name in g:
            w_c = anat.weight_matrix(_get(layer, name)).detach().double()
            w_d = dense_anat.weight_matrix(_get(dense_layer, name)).detach().to(w_c.device).double()
            if w_d.shape != w_c.shape:
                raise RecoupError(
                    f"layer {i} {name}: dense weight {tuple(w_d.shape)} vs compressed "
                    f"{tuple(w_c.shape)}; the dense source is another model"
                )
            b, a, share = eigen_compensation(w_d - w_c, stats[g[0]], rank, damp, energy)
            factors[name] = (b, a)
            if kept is not None:
                kept[f"{anat.spec.layers}.{i}.{name}"] = share
    stats.clear()  # the statistics are not needed for the propagation

    def adder(b: torch.Tensor, a: torch.Tensor):
        def hook(_mod, args, out):
            return out + (args[0] @ a.T.to(out.dtype)) @ b.T.to(out.dtype)

        return hook

    with torch.no_grad(), hooked(*[_get(layer, n).register_forward_hook(adder(*factors[n])) for n in factors]):
        streamer.propagate(i, batch_size)
    for name, (b, a) in factors.items():
        full = f"{anat.spec.layers}.{i}.{name}"
        state[_peft_key(full, "lora_A")] = a.cpu()
        state[_peft_key(full, "lora_B")] = b.cpu()


class EoraRecovery(LoraRecovery):
    """An EoRA compensation, saved and attached exactly as an unmerged PEFT LoRA (alpha = rank: scaling 1); per-layer
    ranks become PEFT's ``rank_pattern`` / ``alpha_pattern`` (:meth:`LoraRecovery.peft_config`)."""

    method = "eora"


# ---------------------------------------------------------------------------- the method (registry entry)


@dataclasses.dataclass
class EoraConfig(Config):
    """``recoup recover ARTIFACT --method eora --rank R``: training-free; needs the artifact's dense source
    (its manifest's ``source``, or ``teacher``) and calibration windows (``calib``, ``nsamples`` x ``seqlen``)."""

    rank: int = 32
    calib: str = "ptb"  # calibration corpus: ptb, wiki, a .txt/.jsonl file
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0  # calibration offsets
    batch_size: int = 8  # calibration windows per layer call
    damp: float = 0.01  # eigenvalue damping, a fraction of their mean
    teacher: str | None = None  # the dense model (default: the artifact's recorded source)
    energy: float | None = None  # per-layer rank: smallest keeping this share of the error's energy (<= rank)

    def __post_init__(self) -> None:
        check(self.rank >= 1, f"--rank must be >= 1 (got {self.rank})")
        check(self.nsamples >= 1, f"nsamples must be >= 1 (got {self.nsamples})")
        check(self.seqlen >= 2, f"seqlen must be >= 2 (got {self.seqlen})")
        check(self.batch_size >= 1, f"batch_size must be >= 1 (got {self.batch_size})")
        check(0 < self.damp < 1, f"damp must be in (0, 1) (got {self.damp})")
        check(bool(str(self.calib).strip()), "calib is empty; name a corpus (ptb, wiki) or a text file")
        check(
            self.energy is None or 0 < self.energy <= 1,
            f"--energy must be in (0, 1] (a share of the error's energy; got {self.energy})",
        )


def fit(loaded, config: EoraConfig, data=None) -> tuple[EoraRecovery, None]:
    """The registry's fit: EoRA on the compressed ``loaded`` (unchanged; its fingerprint checked)."""
    dense = load_teacher(loaded, config.teacher)
    model = base_of(loaded.model)
    before = compression_digest(model, loaded.manifest)
    rec = _eora(loaded, config, model, dense.model)
    del dense
    record_intact(rec, loaded, model, before)
    return rec, None


def fit_lazy(loaded, weights: LazyWeights, config: EoraConfig) -> tuple[EoraRecovery, None]:
    """EoRA on an artifact read one decoder layer at a time (``loaded.model`` a skeleton, ``weights`` its lazy
    weights, :func:`recoup.artifact.lazy.load_artifact_lazy`), its dense source read the same way when it is a
    local safetensors checkpoint (else loaded whole): memory holds one layer of each, not two models. The
    artifact's compression fingerprint is taken layer by layer as each is read; the result is :func:`fit`'s."""
    from recoup.artifact.fingerprint import fingerprint_summary, fingerprinted_linears, linear_fingerprint
    from recoup.model.lazy import load_lazy

    src = teacher_source(loaded, config.teacher)
    lazy = load_lazy(src, "float32")
    dense, dense_weights = lazy if lazy is not None else (load_teacher(loaded, config.teacher), None)
    if lazy is None:
        log.info("eora: the dense source '%s' cannot be read layer by layer; loaded whole", src)
    manifest = loaded.manifest or {}
    anat = anatomy(loaded.model)
    named = fingerprinted_linears(manifest)
    bits = (manifest.get("recipe") or {}).get("bits")
    entries: dict[str, dict] = {}

    def fingerprint(i: int, layer: nn.Module) -> None:
        prefix = f"{anat.spec.layers}.{i}."
        for name in (n for n in named if n.startswith(prefix)):
            module = _get(layer, name[len(prefix) :])
            entries[name] = linear_fingerprint(anat.weight_matrix(module), weights.grid(name), bits)

    rec = _eora(loaded, config, loaded.model, dense.model, weights, dense_weights, fingerprint)
    missing = [n for n in named if n not in entries]
    if missing:
        raise RecoupError(f"the artifact names '{missing[0]}', which is in no decoder layer of its model")
    record_base(rec, loaded, fingerprint_summary({n: entries[n] for n in named}) if named else None)
    return rec, None


def _eora(
    loaded,
    config: EoraConfig,
    model: nn.Module,
    dense: nn.Module,
    weights: LazyWeights | None = None,
    dense_weights: LazyWeights | None = None,
    on_layer: Callable[[int, nn.Module], None] | None = None,
) -> EoraRecovery:
    """The compensation of ``model`` against ``dense`` on the config's calibration windows, as a recovery with
    its protocol in ``meta`` (the fingerprint is the caller's)."""
    from recoup.data.calibration import calibration_windows

    calib = calibration_windows(loaded.tokenizer, config.calib, config.nsamples, config.seqlen, config.seed)
    ana = anatomy(model)
    targets = ana.peft_target_modules("all")
    started = time.time()
    kept: dict[str, float] = {}
    state = compensate(
        model,
        dense,
        calib.input_ids,
        config.rank,
        targets,
        config.batch_size,
        config.damp,
        config.energy,
        kept,
        weights=weights,
        dense_weights=dense_weights,
        on_layer=on_layer,
    )
    seconds = time.time() - started
    top = config.rank if config.energy is None else max(v.shape[0] for k, v in state.items() if ".lora_A." in k)
    rec = EoraRecovery(LoraConfig(rank=top, alpha=float(top)), targets, state, ana.hidden_size)
    ranks = rec.ranks()
    rec.meta.update(
        {
            "init": "eora",
            "teacher": teacher_source(loaded, config.teacher),
            "calibration": calib.protocol,
            "damp": config.damp,
            "seconds": round(seconds, 1),
        }
    )
    if config.energy is not None:
        rec.meta.update(
            {
                "energy": config.energy,
                "rank_cap": config.rank,
                "ranks": ranks,
                "kept_energy": kept,
                "rank_range": [min(ranks.values()), max(ranks.values())],
            }
        )
        log.info(
            "eora energy %g (rank <= %d): ranks %d..%d, mean %.1f; %d parameters in %.1fs",
            config.energy,
            config.rank,
            min(ranks.values()),
            top,
            sum(ranks.values()) / len(ranks),
            rec.num_parameters(),
            seconds,
        )
    else:
        log.info("eora rank %d: %d parameters in %.1fs", config.rank, rec.num_parameters(), seconds)
    return rec


METHOD = RecoveryMethod(
    "eora",
    "EoRA: training-free low-rank compensation in the input eigenspace (Liu et al. 2024)",
    EoraConfig,
    fit,
    EoraRecovery.load,
    peft_type="LORA",
    fit_lazy=fit_lazy,
)
