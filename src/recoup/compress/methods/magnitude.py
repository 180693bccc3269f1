"""Magnitude pruning: drop the smallest |W|, uniformly per layer (unstructured) or per group of M (N:M)."""

from __future__ import annotations

import torch

from recoup.compress.config import CompressConfig
from recoup.compress.masks import nm_mask, unstructured_mask
from recoup.compress.methods.base import LinearResult, Method


def magnitude_prune(weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> LinearResult:
    """weight (rows, cols): zero the ``sparsity`` fraction of smallest |w| of the whole matrix, or N:M per row."""
    score = weight.abs()
    mask = nm_mask(score, *nm) if nm else unstructured_mask(score, sparsity, per_row=False)
    return LinearResult(weight=weight.masked_fill(mask, 0), mask=mask)


def _compress(weight: torch.Tensor, stats, config: CompressConfig) -> LinearResult:
    return magnitude_prune(weight, config.sparsity or 0.0, config.nm)


METHOD = Method("magnitude", "none", _compress, paper="magnitude pruning baseline", prune="required")
