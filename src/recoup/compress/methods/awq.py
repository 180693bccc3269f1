"""AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration").

For each group of linears that read the same input, search per-input-channel scales
``s = mean|x|^a / sqrt(max * min)`` over ``a`` in {0, 1/grid, ...}, picking the one whose
quantized ``Q(W * s) (x / s)`` best reproduces ``W x`` on calibration tokens; multiply the
columns of W by s and fold 1/s into the op that produces x (a norm's weight/bias, or the output
rows of the preceding linear); then round to nearest. Simplification: the loss is measured on the
group's own linear outputs (llm-awq measures the whole attention / MLP block output); weight
clipping search is not done. Groups with no foldable preceding op (GPT-2's projections behind a
GELU / fused qkv) are plain RTN. Which op precedes which group is per-architecture data below.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from recoup.compress.config import CompressConfig, MethodOptions
from recoup.config import check
from recoup.compress.methods.base import LinearResult, Method
from recoup.compress.methods.rtn import rtn
from recoup.artifact.grid import QuantGrid
from recoup.compress.stats import ActSampleStats

log = logging.getLogger(__name__)

_LLAMA_LIKE = {
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"): "input_layernorm",
    ("self_attn.o_proj",): "self_attn.v_proj",
    ("mlp.gate_proj", "mlp.up_proj"): "post_attention_layernorm",
    ("mlp.down_proj",): "mlp.up_proj",
}
# group (as in anatomy's ``sequential``) -> the op whose output is the group's input
PRECEDING_OP: dict[str, dict[tuple[str, ...], str]] = {
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE, "qwen3": _LLAMA_LIKE,
    "gemma3_text": {**_LLAMA_LIKE, ("mlp.gate_proj", "mlp.up_proj"): "pre_feedforward_layernorm"},
    "opt": {("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"): "self_attn_layer_norm",
            ("self_attn.out_proj",): "self_attn.v_proj", ("fc1",): "final_layer_norm", ("fc2",): "fc1"},
    "gpt2": {("attn.c_attn",): "ln_1", ("mlp.c_fc",): "ln_2"},
}
NORM_WEIGHT_OFFSET = {"gemma3_text"}  # Gemma's RMSNorm computes x * (1 + weight)


@torch.no_grad()
def awq_search_scales(weights: list[torch.Tensor], x: torch.Tensor, x_mean_abs: torch.Tensor, grid: QuantGrid,
                      n_grid: int = 20) -> tuple[torch.Tensor, float, float]:
    """weights: list of (out_i, cols); x: (N, cols) sample inputs; x_mean_abs: (cols,).

    Returns (s (cols,), best exponent, its summed mean-squared output error)."""
    refs = [x @ w.t() for w in weights]
    best = (torch.ones_like(x_mean_abs), 0.0, float("inf"))
    for r in range(n_grid):
        ratio = r / n_grid
        s = x_mean_abs.pow(ratio).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, ref in zip(weights, refs):
            wq = rtn(w * s[None, :], grid).weight / s[None, :]
            err += float(((x @ wq.t() - ref) ** 2).mean())
        if err < best[2]:
            best = (s, ratio, err)
    return best


def _prepare(view, names: tuple[str, ...], stats: ActSampleStats, config: CompressConfig) -> dict:
    """Search scales for the group ``names`` of ``view`` (the engine's LayerView) and fold them."""
    prev = PRECEDING_OP.get(view.model_type, {}).get(tuple(names))
    if prev is None:
        return {"awq": "no foldable preceding op; plain RTN"}
    weights = [view.get_weight(n) for n in names]
    prev_mod = view.module(prev)
    is_linear = prev in view.linear_names
    if is_linear:
        prev_w = view.get_weight(prev)
        if prev_w.shape[0] != weights[0].shape[1]:
            return {"awq": f"{prev} output {prev_w.shape[0]} != input {weights[0].shape[1]} (GQA); plain RTN"}
    grid = QuantGrid(config.bits, config.sym, config.group_size)
    s, ratio, err = awq_search_scales(weights, stats.sample(), stats.mean_abs(), grid, config.options.grid)
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
    return {"awq_ratio": ratio, "awq_search_err": err, "awq_folded_into": prev}


def _compress(weight: torch.Tensor, stats, config: CompressConfig) -> LinearResult:
    return rtn(weight, QuantGrid(config.bits, config.sym, config.group_size))


@dataclasses.dataclass
class AWQOptions(MethodOptions):
    """AWQ's scale search: ``grid`` exponents tried in [0, 1), ``samples`` calibration tokens kept per group."""

    grid: int = 20
    samples: int = 4096

    def check(self, config) -> None:
        check(isinstance(self.grid, int) and self.grid >= 1, f"grid must be >= 1 (got {self.grid})")
        check(isinstance(self.samples, int) and self.samples >= 16, f"samples must be >= 16 (got {self.samples})")


METHOD = Method("awq", "act_sample", _compress, prepare_group=_prepare, paper="Lin et al. 2023 (AWQ)",
                quantize="required", options=AWQOptions)
