"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models").

Score S_ij = |W_ij| * ||X_j||_2, compared within each output row (unstructured) or within each
group of M columns of a row (N:M); no weight update.
"""

from __future__ import annotations

import dataclasses

import torch

from recoup.blocks import row_blocks
from recoup.compress.config import CompressConfig, MethodOptions
from recoup.compress.masks import nm_mask, unstructured_mask
from recoup.compress.methods.base import LinearResult, Method
from recoup.compress.stats import ActNormStats


@dataclasses.dataclass
class WandaOptions(MethodOptions):
    """Wanda's order. On (the default): each group's input norms from the layer with the groups before it
    already pruned, one forward per layer. Off: the reference code's order (locuslab/wanda ``prune_wanda``, as
    llm-compressor's WandaPruningModifier), every group's norms from one forward of the dense layer. The
    comparison behind the default: docs/guide/compress.md and benchmarks/results/compress_vs_peer/."""

    true_sequential: bool = True  # on: norms after the earlier groups are pruned; off: the reference's order


def wanda_prune(
    weight: torch.Tensor, col_norms: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None
) -> LinearResult:
    """weight (rows, cols), col_norms (cols,) = ||X_j||_2 over the calibration tokens.

    Rows are scored and ranked in blocks (:func:`row_blocks`): every choice is within a
    row, so the mask is the one of the whole matrix, while the score and ranking buffers stay a block's size
    (an 8B model's MLP matrix would otherwise need about 0.9 GB of them)."""
    norms = col_norms.to(weight)[None, :]
    mask = torch.empty(weight.shape, dtype=torch.bool, device=weight.device)
    for rows in row_blocks(*weight.shape):
        score = weight[rows].abs() * norms
        mask[rows] = nm_mask(score, *nm) if nm else unstructured_mask(score, sparsity, per_row=True)
        del score
    return LinearResult(weight=weight.masked_fill(mask, 0), mask=mask)


def _compress(weight: torch.Tensor, stats: ActNormStats, config: CompressConfig) -> LinearResult:
    return wanda_prune(weight, stats.norms(), config.sparsity or 0.0, config.nm)


METHOD = Method("wanda", "act_norm", _compress, paper="Sun et al. 2023 (Wanda)", prune="required", options=WandaOptions)
