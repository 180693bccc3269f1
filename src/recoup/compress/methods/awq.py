"""AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration").

For each group of linears that read the same input x, search per-input-channel scales s and pick the one whose
quantized ``Q(W * s) (x / s)`` best reproduces the *block's* output (the paper's loss: the attention module for
q/k/v, the MLP for gate/up, the linear itself for o_proj / down_proj) on the calibration windows (every token by
default; ``block_tokens`` caps it); multiply the columns of W by s and fold 1/s into the op that produces x (a
norm's weight/bias, or the output rows of the preceding linear).

- Candidates: ``s = mean|x|^a`` (the paper), or with ``duo_scaling`` (the default, as AutoAWQ and llm-compressor)
  ``s = mean|x|^a / (mean|W~|^(1-a) + 1e-4)`` (W~: |W| normalised per quantization group), normalised by
  ``sqrt(max s * min s)``, over ``grid`` exponents evenly in [0, 1] (llm-compressor's grid: with duo scaling a
  plain a=0 plus grid-1 duo exponents).
- Clipping (``rounding="rtn"``): the paper's search per output row and quantization group for the threshold
  ``max|w| * (1 - i/20)``, i < 10, that best reproduces the group's output on ``clip_tokens`` sampled inputs (q and
  k excepted, as in llm-awq: the softmax reshapes their error); then round to nearest.
- ``rounding="gptq"``: round by GPTQ at its defaults instead, on the Hessian of the group's rescaled inputs,
  H / (s s^T) (AWQ + GPTQ: the paper reports the two as orthogonal and combines them at very low bit widths), with
  no clipping search, whose thresholds are chosen for round-to-nearest.
- Order (``true_sequential`` None): with ``"rtn"`` true-sequential (each group's statistics from the layer with
  the groups before it compressed); with ``"gptq"`` every group's statistics from the dense layer.
  ``true_sequential`` forces either. llm-compressor's AWQModifier + GPTQModifier uses a third order: AWQ smooths
  the whole model in one pass, then GPTQ quantizes it in a second, on the smoothed inputs' Hessians.

Groups with no foldable preceding op (GPT-2's projections behind a GELU or a fused qkv; o_proj behind a
grouped-query v_proj, as llm-awq, AutoAWQ and llm-compressor) are not rescaled, only clipped (or GPTQ-rounded).
Which op precedes a group and which block's output measures it are per-architecture data below. The measurements
behind each default (the order, every-token block loss, no clipping before GPTQ, no o_proj scaling behind
grouped-query attention) are in benchmarks/results/awq_w3/.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from recoup.artifact.grid import QuantGrid
from recoup.compress.config import CompressConfig, MethodOptions
from recoup.compress.methods.base import LinearResult, Method
from recoup.compress.methods.gptq import gptq
from recoup.compress.methods.rtn import rtn
from recoup.compress.stats import BlockIOStats
from recoup.config import check

log = logging.getLogger(__name__)

_LLAMA_LIKE = {
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"): "input_layernorm",
    ("self_attn.o_proj",): "self_attn.v_proj",
    ("mlp.gate_proj", "mlp.up_proj"): "post_attention_layernorm",
    ("mlp.down_proj",): "mlp.up_proj",
}
# group (as in anatomy's ``sequential``) -> the op whose output is the group's input
PRECEDING_OP: dict[str, dict[tuple[str, ...], str]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma3_text": {**_LLAMA_LIKE, ("mlp.gate_proj", "mlp.up_proj"): "pre_feedforward_layernorm"},
    "opt": {
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"): "self_attn_layer_norm",
        ("self_attn.out_proj",): "self_attn.v_proj",
        ("fc1",): "final_layer_norm",
        ("fc2",): "fc1",
    },
    "gpt2": {("attn.c_attn",): "ln_1", ("mlp.c_fc",): "ln_2"},
}
NORM_WEIGHT_OFFSET = {"gemma3_text"}  # Gemma's RMSNorm computes x * (1 + weight)


_LLAMA_BLOCK = {
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"): "self_attn",
    ("mlp.gate_proj", "mlp.up_proj"): "mlp",
}
# group -> the module whose output the scale search compares (absent: the group's single linear itself)
BLOCK: dict[str, dict[tuple[str, ...], str]] = {
    "llama": _LLAMA_BLOCK,
    "mistral": _LLAMA_BLOCK,
    "qwen2": _LLAMA_BLOCK,
    "qwen3": _LLAMA_BLOCK,
    "gemma3_text": _LLAMA_BLOCK,
    "opt": {("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"): "self_attn"},
    "gpt2": {("attn.c_attn",): "attn", ("mlp.c_fc",): "mlp"},
}
NO_CLIP = ("q_proj", "k_proj")  # llm-awq's auto_clip skips the query and key projections


def block_of(model_type: str, names: tuple[str, ...]) -> str | None:
    """The module (relative to a decoder layer) whose output measures the group ``names``."""
    if PRECEDING_OP.get(model_type, {}).get(tuple(names)) is None:
        return None  # nothing to fold the scales into: no scale search, no block to record
    return BLOCK.get(model_type, {}).get(tuple(names), names[0] if len(names) == 1 else None)


def scale_candidates(
    x_mean: torch.Tensor, w_mean: torch.Tensor | None, n_grid: int
) -> list[tuple[float, torch.Tensor]]:
    """(exponent, s (cols,)) for every candidate: llm-compressor's grid (duo: a=0 plain, then grid-1 duo exponents
    in [0, 1]; plain: grid exponents in [0, 1])."""
    if w_mean is None:
        params = [(i / max(n_grid - 1, 1), False) for i in range(n_grid)]
    else:
        params = [(0.0, False)] + [(i / max(n_grid - 2, 1), True) for i in range(max(n_grid - 1, 1))]
    out = []
    for a, duo in params:
        s = (x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4)) if duo else x_mean.pow(a)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
        out.append((a, s))
    return out


def weight_mean(weights: list[torch.Tensor], grid: QuantGrid) -> torch.Tensor:
    """(cols,) mean over the rows of every weight (rows_i, cols) of |w| normalised by its quantization group's max."""
    total = 0
    rows = 0
    for w in weights:
        g = grid.group_size or w.shape[1]
        a = w.abs()
        parts = [a[:, i : i + g] / (a[:, i : i + g].amax(dim=1, keepdim=True) + 1e-6) for i in range(0, w.shape[1], g)]
        total = total + torch.cat(parts, 1).sum(0)
        rows += w.shape[0]
    return total / rows


def _call(block: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def awq_search_block(
    view, names: tuple[str, ...], stats: BlockIOStats, grid: QuantGrid, n_grid: int, duo: bool
) -> tuple[torch.Tensor, float, float, float]:
    """Try every candidate scale on the group ``names`` of ``view``, measuring the MSE of the recorded block
    calls' outputs (block output (b, T, H) per call) against the unquantized ones. Restores the weights.

    Returns (best s (cols,), its exponent, its loss, the loss of s = 1)."""
    block = stats.parent
    weights = [view.get_weight(n) for n in names]
    refs = [_call(block, a, k).float() for a, k in stats.inputs]
    numel = sum(r.numel() for r in refs)
    x_mean = stats.mean_abs()
    best = (torch.ones_like(x_mean), 0.0, float("inf"))
    first = None
    try:
        for a, s in scale_candidates(x_mean, weight_mean(weights, grid) if duo else None, n_grid):
            for n, w in zip(names, weights):
                view.set_weight(n, rtn(w * s[None, :], grid).weight / s[None, :])
            loss = sum(
                float(((_call(block, a_, k_).float() - r) ** 2).sum()) for (a_, k_), r in zip(stats.inputs, refs)
            ) / max(numel, 1)
            first = loss if first is None else first
            if loss < best[2]:
                best = (s, a, loss)
    finally:
        for n, w in zip(names, weights):
            view.set_weight(n, w)
    return best[0], best[1], best[2], first


@torch.no_grad()
def awq_clip(
    weight: torch.Tensor,
    x: torch.Tensor,
    grid: QuantGrid,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    rows_per_batch: int = 64,
) -> torch.Tensor:
    """The paper's clipping search (llm-awq ``auto_clip_layer``): weight (rows, cols), x (n, cols) sampled inputs.

    Per output row and quantization group, the threshold ``t = max|w| * (1 - i/n_grid)`` for i <
    ``max_shrink * n_grid`` whose clamped-then-quantized weights give the smallest mean squared partial
    output ``sum_j x_j w_j`` over the group's columns. Returns the clipped weight (rows, cols)."""
    rows, cols = weight.shape
    g = grid.group_size or cols
    out = weight.clone()
    for start in range(0, cols, g):  # one quantization group of columns at a time (ragged last group)
        wg, xg = weight[:, start : start + g], x[:, start : start + g]
        org_max = wg.abs().amax(dim=1, keepdim=True)  # (rows, 1)
        best_max, best_err = org_max.clone(), torch.full_like(org_max, float("inf"))
        sub = QuantGrid(grid.bits, grid.sym, None)
        for r0 in range(0, rows, rows_per_batch):
            w_b, m_b = wg[r0 : r0 + rows_per_batch], org_max[r0 : r0 + rows_per_batch]
            ref = xg @ w_b.t()  # (n, rows_b)
            for i in range(int(max_shrink * n_grid)):
                t = m_b * (1 - i / n_grid)
                cur = torch.maximum(torch.minimum(w_b, t), -t)
                q, _, _ = sub.quantize_matrix(cur)
                err = ((xg @ q.t() - ref) ** 2).mean(dim=0)[:, None]  # (rows_b, 1)
                better = err < best_err[r0 : r0 + rows_per_batch]
                best_err[r0 : r0 + rows_per_batch] = torch.where(better, err, best_err[r0 : r0 + rows_per_batch])
                best_max[r0 : r0 + rows_per_batch] = torch.where(better, t, best_max[r0 : r0 + rows_per_batch])
        out[:, start : start + g] = torch.maximum(torch.minimum(wg, best_max), -best_max)
    return out


def _prepare(view, names: tuple[str, ...], stats: BlockIOStats, config: CompressConfig) -> dict:
    """Search scales for the group ``names`` of ``view`` (the engine's LayerView) on its block's output and
    fold them; then clip each linear's weights (the paper's clipping search) on the rescaled inputs."""
    grid = config.grid()
    opts = config.options
    info: dict = {}
    prev = PRECEDING_OP.get(view.model_type, {}).get(tuple(names))
    weights = [view.get_weight(n) for n in names]
    s = None
    if prev is None:
        info["awq"] = "no foldable preceding op; clipping only"
    elif prev in view.linear_names and view.get_weight(prev).shape[0] != weights[0].shape[1]:
        info["awq"] = (
            f"{prev} output {view.get_weight(prev).shape[0]} != input {weights[0].shape[1]} (GQA); clipping only"
        )
    elif not stats.inputs:
        info["awq"] = "no block calls recorded; clipping only"
    else:
        s, ratio, err, err0 = awq_search_block(view, names, stats, grid, opts.grid, opts.duo_scaling)
        _fold(view, names, weights, prev, s, grid)
        stats.input_scale = s  # the group's inputs are now x / s
        info.update(
            {
                "awq_ratio": ratio,
                "awq_block_loss": err,
                "awq_block_loss_unscaled": err0,
                "awq_folded_into": prev,
                "awq_scale_spread": float(s.max() / s.min()),
            }
        )
    if opts.clip and opts.rounding == "rtn":  # thresholds chosen for round-to-nearest; GPTQ fits its own grids
        x = stats.sample()
        x = x / s[None, :] if s is not None else x
        x = x[torch.linspace(0, x.shape[0] - 1, min(opts.clip_tokens, x.shape[0]), device=x.device).long()]
        for n in names:
            if not n.endswith(NO_CLIP):
                view.set_weight(n, awq_clip(view.get_weight(n), x, grid))
        info["awq_clip"] = [n for n in names if not n.endswith(NO_CLIP)]
    return info


def _fold(
    view, names: tuple[str, ...], weights: list[torch.Tensor], prev: str, s: torch.Tensor, grid: QuantGrid
) -> None:
    """Multiply the group's columns by s and fold 1/s into ``prev`` (its output rows, or a norm's weight/bias)."""
    prev_mod = view.module(prev)
    is_linear = prev in view.linear_names
    prev_w = view.get_weight(prev) if is_linear else None
    for n, w in zip(names, weights):
        view.set_weight(n, w * s[None, :])
    if is_linear:
        folded = prev_w / s[:, None]
        done = view.results.get(prev)
        if done is not None and done.scale is not None:
            # ``prev`` is already quantized: its rows move to rescaled grids (scale / s). The division alone
            # leaves them a float rounding off those grids, so snap them back with the grid's own quantize.
            done.scale = done.scale / s[:, None].to(done.scale)
            g = done.g_idx.long()
            folded = grid.quantize(folded, done.scale.float()[:, g], done.zero.float()[:, g])
        view.set_weight(prev, folded)
        bias = getattr(prev_mod, "bias", None)
        if bias is not None:
            bias.data.copy_((bias.float() / s).to(bias.dtype))
    else:
        weight = prev_mod.weight
        if view.model_type in NORM_WEIGHT_OFFSET:
            weight.data.copy_(((1 + weight.float()) / s - 1).to(weight.dtype))
        else:
            weight.data.copy_((weight.float() / s).to(weight.dtype))
        if getattr(prev_mod, "bias", None) is not None:
            prev_mod.bias.data.copy_((prev_mod.bias.float() / s).to(prev_mod.bias.dtype))


def _compress(weight: torch.Tensor, stats, config: CompressConfig) -> LinearResult:
    """Round the prepared (scaled, clipped) weight: to nearest, or by GPTQ on the Hessian of the inputs the
    rescaled weight now reads (x / s: H / (s s^T))."""
    if config.options.rounding == "rtn":
        return rtn(weight, config.grid())
    h = stats.hessian.hessian()
    s = getattr(stats, "input_scale", None)
    if s is not None:
        h = h / (s[:, None] * s[None, :])
    res = gptq(weight, h, dataclasses.replace(config, method="gptq", options=None), stats.hessian.factors)
    return dataclasses.replace(res, info={**res.info, "awq_rounding": "gptq"})


@dataclasses.dataclass
class AWQOptions(MethodOptions):
    """AWQ's keys. Defaults: llm-compressor's AWQModifier (n_grid=20, duo_scaling=True) for the scale search,
    the paper's llm-awq for the clipping search (20-step grid, at most 50% shrink, 512 sampled tokens)."""

    grid: int = 20  # candidate scale exponents, evenly in [0, 1]
    duo_scaling: bool = True  # candidates divide by the normalised weight magnitude too (AutoAWQ / llm-compressor)
    # the paper's per-group weight-clipping search after scaling (llm-awq auto_clip); with rounding="rtn" only
    clip: bool = True
    # calibration tokens (whole batches, spread over the set) the block loss is computed on; None: all (the reference's)
    block_tokens: int | None = None
    samples: int = 4096  # input rows kept per group for the clipping search and the reported error
    clip_tokens: int = 512  # of those, rows the clipping search uses (llm-awq: 512)
    # rtn: round to nearest (the paper's AWQ) | gptq: GPTQ at its defaults on the rescaled inputs' Hessian (AWQ + GPTQ)
    rounding: str = "rtn"
    # None: on with rounding rtn, off (every group's statistics from the dense layer) with gptq
    true_sequential: bool | None = None

    def check(self, config) -> None:
        check(isinstance(self.grid, int) and self.grid >= 2, f"grid must be >= 2 (got {self.grid})")
        check(isinstance(self.samples, int) and self.samples >= 16, f"samples must be >= 16 (got {self.samples})")
        check(
            self.block_tokens is None or (isinstance(self.block_tokens, int) and self.block_tokens >= 1),
            f"block_tokens must be >= 1 (got {self.block_tokens})",
        )
        check(
            isinstance(self.clip_tokens, int) and self.clip_tokens >= 16,
            f"clip_tokens must be >= 16 (got {self.clip_tokens})",
        )
        check(self.rounding in ("rtn", "gptq"), f"rounding must be rtn or gptq (got {self.rounding!r})")
        if self.true_sequential is None:
            self.true_sequential = self.rounding == "rtn"


METHOD = Method(
    "awq",
    "block_io",
    _compress,
    prepare_group=_prepare,
    paper="Lin et al. 2023 (AWQ)",
    quantize="required",
    options=AWQOptions,
    block=block_of,
)
