"""Row blocks: row-separable work on a large matrix in slices of rows, so its temporaries are a block's size.

Compressing or packing one linear of a big model (LLaMA-3-8B's MLP: 14336 x 4096, 235 MB in float32) makes
several full-size temporaries when written as whole-matrix expressions (``scale[:, g] * (q - zero[:, g])``
alone is four). Work whose every row is computed independently gives the same bits when done a block of rows at
a time, and then holds one block's temporaries (:data:`ROW_BLOCK_ELEMENTS` entries) instead of the matrix's.
"""

from __future__ import annotations

import torch

ROW_BLOCK_ELEMENTS = 1 << 22  # 4 Mi entries (16 MB in float32): the temporaries of one block of rows


def row_blocks(rows: int, cols: int) -> list[slice]:
    """Slices of consecutive rows of a (rows, cols) matrix, each about ``ROW_BLOCK_ELEMENTS`` entries, for
    row-separable work whose temporaries should stay a block's size rather than the matrix's."""
    step = max(1, ROW_BLOCK_ELEMENTS // max(1, cols))
    return [slice(r, r + step) for r in range(0, rows, step)]


def zero_fraction(t: torch.Tensor) -> float:
    """The fraction of ``t``'s entries that are zero, counted without a temporary of ``t``'s size (``(t == 0)``
    is a bool copy, and summing a bool tensor makes an int64 one: 0.5 GB for an 8B model's MLP matrix)."""
    return (t.numel() - int(torch.count_nonzero(t))) / max(1, t.numel())
