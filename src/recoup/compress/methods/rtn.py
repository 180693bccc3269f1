"""Round-to-nearest quantization onto per-group grids (the baseline of GPTQ and AWQ)."""

from __future__ import annotations

import torch

from recoup.artifact.grid import QuantGrid
from recoup.compress.config import CompressConfig
from recoup.compress.methods.base import LinearResult, Method


def rtn(weight: torch.Tensor, grid: QuantGrid) -> LinearResult:
    """weight (rows, cols) -> every weight rounded to the nearest point of its group's grid."""
    w, scale, zero = grid.quantize_matrix(weight)
    return LinearResult(weight=w, scale=scale, zero=zero, g_idx=grid.group_index(weight.shape[1]))


def _compress(weight: torch.Tensor, stats, config: CompressConfig) -> LinearResult:
    return rtn(weight, config.grid())


METHOD = Method("rtn", "none", _compress, paper="round-to-nearest baseline", quantize="required")
