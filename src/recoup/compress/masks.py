"""Which weights to prune, chosen from a score (lower score = pruned first).

Masks are boolean with True = pruned. Counts are exact: ``topk`` picks exactly ``k`` entries even
with ties, so a 50% mask of a (rows, cols) matrix with an even number of entries prunes exactly half.
"""

from __future__ import annotations

import torch

from recoup.errors import RecoupError


def unstructured_mask(score: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Prune the ``floor(sparsity * n)`` lowest scores of the whole matrix, or of each row if ``per_row``.

    score: (rows, cols). Returns a bool mask of the same shape.
    """
    mask = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    if per_row:
        k = int(score.shape[1] * sparsity)
        if k > 0:
            idx = torch.topk(score, k, dim=1, largest=False).indices
            mask.scatter_(1, idx, True)
        return mask
    k = int(score.numel() * sparsity)
    if k > 0:
        idx = torch.topk(score.flatten(), k, largest=False).indices
        mask.view(-1)[idx] = True
    return mask


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M mask: in every group of ``m`` consecutive columns of each row, keep the ``n`` highest scores.

    score: (rows, cols) with cols divisible by m. Returns a bool mask (True = pruned).
    """
    rows, cols = score.shape
    if cols % m:
        raise RecoupError(f"N:M sparsity with M={m} needs the input size to be a multiple of {m} (got {cols})")
    groups = score.reshape(rows, cols // m, m)
    idx = torch.topk(groups, m - n, dim=2, largest=False).indices
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=score.device)
    mask.scatter_(2, idx, True)
    return mask.reshape(rows, cols)


def is_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True iff every group of ``m`` consecutive columns of every row has at most ``n`` non-zeros."""
    rows, cols = weight.shape
    if cols % m:
        return False
    nonzero = (weight.reshape(rows, cols // m, m) != 0).sum(dim=2)
    return bool((nonzero <= n).all())
