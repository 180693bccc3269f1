"""The one blocked Optimal-Brain-Surgeon update shared by SparseGPT and GPTQ.

SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned
in One-Shot") and GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers") process the columns of W (rows, cols) left to right in
blocks, compress one column at a time and spread its error over the not-yet-processed columns with
the upper Cholesky factor of H^-1, H = 2 X^T X (cols, cols). Pruning (adaptive mask per block, or
N:M), quantization (group grids fitted when a group starts) or both in one pass: the joint
"8x" compression of Compress-Then-Prompt is ``sparsity=0.5`` with a 4-bit grid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Iterator

import torch

from recoup.artifact.grid import QuantGrid
from recoup.compress.config import MethodOptions
from recoup.config import check
from recoup.errors import RecoupError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ObsResult:
    weight: torch.Tensor  # (rows, cols) float32, compressed
    mask: torch.Tensor | None  # (rows, cols) bool, True = pruned
    scale: torch.Tensor | None  # (rows, groups)
    zero: torch.Tensor | None  # (rows, groups)
    g_idx: torch.Tensor | None  # (cols,) int32 group of each column
    loss: float  # sum of the OBS losses (w - q)^2 / [H^-1]_jj^2 / 2
    damp: float  # the dampening that was used (after any retries)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the OBS update on one thread: with several threads each small per-column op (a vector of ``rows``)
    pays a barrier, which dominates the column loop, and the results would depend on the core count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def damped_inverse_cholesky(
    h: torch.Tensor, percdamp: float, retries: int = 6, dead: torch.Tensor | None = None, scale: float = 1.0
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, H = ``scale * h`` (``scale`` != 1: H is never
    made beside ``h``, its scaled values go straight into the damped copy). If H is singular or not positive
    definite, multiply the dampening by 10 and retry, logging it; gives up with RecoupError."""
    diag = torch.diag(h) * scale if scale != 1.0 else torch.diag(h).clone()
    if dead is not None:  # dead columns (no input) get 1 on the diagonal, as GPTQ's reference sets H[dead, dead]
        diag[dead] = 1
    mean_diag = float(diag.mean())
    damp = percdamp
    for attempt in range(retries + 1):
        try:
            # at most two (cols, cols) matrices besides h at a time (an 8B model's down_proj: 0.8 GB each);
            # adding to the diagonal in place is H + damp * mean * I value for value
            hd = h * scale if scale != 1.0 else h.clone()  # value for value the scaled matrix's copy
            hd.diagonal().copy_(diag).add_(damp * mean_diag)
            chol = torch.linalg.cholesky(hd)
            del hd
            hinv = torch.cholesky_inverse(chol)
            del chol
            upper = torch.linalg.cholesky(hinv, upper=True)
            del hinv
            if bool(torch.isfinite(upper).all()):
                return upper, damp
            del upper
        except torch.linalg.LinAlgError:
            pass
        if attempt < retries:
            log.warning("Hessian not positive definite with percdamp=%g; retrying with %g", damp, damp * 10)
        damp *= 10
    raise RecoupError(
        f"Hessian stays singular even with percdamp={damp / 10:g}; the calibration data may be too "
        f"small or degenerate (try more --nsamples)"
    )


@dataclasses.dataclass
class OBSOptions(MethodOptions):
    """Keys of the blocked OBS update (SparseGPT and GPTQ). Defaults: the papers' reference code and
    llm-compressor's GPTQModifier / SparseGPTModifier (``block_size=128``, ``dampening_frac=0.01``)."""

    blocksize: int = 128  # columns per OBS block (lazy batch update); N:M needs a multiple of M
    percdamp: float = (
        0.01  # Hessian dampening added to the diagonal, as a fraction of its mean (x10 per retry if singular)
    )
    # each group's Hessian from the layer with the groups before it compressed; off: every group's from the dense layer
    true_sequential: bool = True

    def check(self, config) -> None:
        check(isinstance(self.blocksize, int) and self.blocksize >= 1, f"blocksize must be >= 1 (got {self.blocksize})")
        check(0.0 < float(self.percdamp) <= 1.0, f"percdamp must be in (0, 1] (got {self.percdamp})")
        if config.nm is not None:
            m = config.nm[1]
            check(
                self.blocksize % m == 0, f"blocksize {self.blocksize} must be a multiple of M={m} for {config.pattern}"
            )


def obs_compress(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    sparsity: float = 0.0,
    nm: tuple[int, int] | None = None,
    grid: QuantGrid | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    factors: dict | None = None,
    hessian_scale: float = 1.0,
) -> ObsResult:
    """Prune and/or quantize ``weight`` (rows, cols) with Hessian ``hessian_scale * hessian`` (cols, cols).

    Unstructured pruning picks, per block of ``blocksize`` columns, exactly ``floor(sparsity * rows *
    blocksize)`` weights of lowest ``w^2 / [H^-1]_jj^2`` (SparseGPT's adaptive mask selection); N:M
    picks per row and group of M columns. With a grid every kept weight lands on its group's grid; in
    joint mode kept weights never round to exact zero, so the zeros are exactly the pruned ones.

    factors: a dict kept with the Hessian (``HessianStats.factors``) where the damped inverse Cholesky
    factor is stored and reused by the next linear with the same Hessian and settings (q, k, v share one).
    """
    # The whole update on one thread: with torch's threads the factorisations and block updates sum in an order
    # that depends on the core count, and the compressed weights (and their perplexity) with them. One thread
    # keeps every result machine-independent; independent linears run side by side instead (compress/parallel.py).
    with single_thread():
        return _obs_compress(
            weight,
            hessian,
            sparsity=sparsity,
            nm=nm,
            grid=grid,
            blocksize=blocksize,
            percdamp=percdamp,
            act_order=act_order,
            static_groups=static_groups,
            factors=factors,
            hessian_scale=hessian_scale,
        )


def _factor(
    hessian: torch.Tensor, percdamp: float, act_order: bool, device: torch.device, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, float]:
    """(dead columns, act-order permutation or None, upper Cholesky factor of the damped inverse, damp), of the
    Hessian ``scale * hessian``."""
    h = hessian.detach().float().contiguous().to(device)  # read only: the dead columns' fix goes into a copy
    diag = torch.diag(h) * scale  # the scaled Hessian's diagonal, value for value
    dead = diag == 0
    fixed = diag.masked_fill(dead, 1)
    perm = torch.argsort(fixed, descending=True) if act_order else None
    if perm is not None:
        h, dead = h[perm][:, perm], dead[perm]
    hinv, damp = damped_inverse_cholesky(h, percdamp, dead=dead, scale=scale)
    return dead, perm, hinv, damp


def _obs_compress(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    sparsity: float,
    nm: tuple[int, int] | None,
    grid: QuantGrid | None,
    blocksize: int,
    percdamp: float,
    act_order: bool,
    static_groups: bool,
    factors: dict | None,
    hessian_scale: float,
) -> ObsResult:
    w = weight.detach().float().contiguous().clone()
    rows, cols = w.shape
    prune = nm is not None or sparsity > 0
    key = (float(percdamp), bool(act_order), str(w.device))
    with getattr(factors, "lock", None) or contextlib.nullcontext():  # linears side by side: the first computes it
        if factors is not None and key in factors:
            dead, perm, hinv, damp = factors[key]
        else:
            dead, perm, hinv, damp = _factor(hessian, percdamp, act_order, w.device, hessian_scale)
            if factors is not None:
                factors[key] = (dead, perm, hinv, damp)
    w[:, dead] = 0

    gsize = (grid.group_size or cols) if grid else cols
    ngroups = (cols + gsize - 1) // gsize
    scale = torch.zeros(rows, ngroups, device=w.device) if grid else None
    zero = torch.zeros(rows, ngroups, device=w.device) if grid else None
    if grid and static_groups:
        for g in range(ngroups):
            scale[:, g], zero[:, g] = grid.fit(w[:, g * gsize : (g + 1) * gsize])

    if perm is not None:
        w = w[:, perm]
    # group of each processed column: by original index if static, by processing position otherwise
    orig_cols = perm if perm is not None else torch.arange(cols, device=w.device)
    col_group = (
        (orig_cols // gsize) if static_groups or perm is None else (torch.arange(cols, device=w.device) // gsize)
    )

    mask = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    losses = torch.zeros(rows, device=w.device)

    groups_of = col_group.tolist()
    nought = w.new_zeros(())
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone(memory_format=torch.contiguous_format)
        q1 = torch.zeros_like(w1) if grid is not None else None
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d1 = torch.diag(hinv1)
        mask1 = torch.zeros_like(w1, dtype=torch.bool)
        if prune and nm is None:
            score = w1**2 / d1[None, :] ** 2
            k = int(score.numel() * sparsity)
            if k > 0:
                mask1.view(-1)[torch.topk(score.flatten(), k, largest=False).indices] = True
        # Step i spreads column i's error over the columns after it only, so column i keeps the value step i
        # compressed and the block's compressed values (pruning only) and losses are read off w1 at the end.
        # Every later column gets the same products and subtractions in the same order as the reference loop's
        # update of columns i: (tests/test_obs_loop.py: bitwise equal).
        for i in range(count):
            col = i1 + i
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                score = w1[:, i : i + m] ** 2 / d1[i : i + m][None, :] ** 2
                mask1[:, i : i + m].scatter_(1, torch.topk(score, m - n, dim=1, largest=False).indices, True)
            wc = w1[:, i]
            if grid is None:  # pruning only: the error is the pruned weights themselves
                err = torch.where(mask1[:, i], wc, nought)
            else:
                g = groups_of[col]
                if not static_groups and col % gsize == 0:
                    ahead = torch.cat([w1[:, i:].masked_fill(mask1[:, i:], 0), w[:, i2:]], dim=1)[:, :gsize]
                    scale[:, g], zero[:, g] = grid.fit(ahead)
                q = wc.masked_fill(mask1[:, i], 0) if prune else wc
                keep = ~mask1[:, i] if prune else None
                q = grid.quantize(
                    q[:, None], scale[:, g], zero[:, g], keep_nonzero=None if keep is None else keep[:, None]
                )[:, 0]
                if prune:
                    q = q.masked_fill(mask1[:, i], 0)
                q1[:, i] = q
                err = wc - q
            err.div_(hinv1[i, i])
            if i + 1 < count:
                w1[:, i + 1 :] -= err[:, None] @ hinv1[i, i + 1 :][None, :]
            err1[:, i] = err
        if q1 is None:
            q1 = w1.masked_fill(mask1, 0)
        losses += ((w1 - q1) ** 2 / d1[None, :] ** 2 / 2).sum(1)
        w[:, i1:i2] = q1
        mask[:, i1:i2] = mask1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        w, mask = w[:, inv], mask[:, inv]
        if grid is not None:
            g_idx = col_group[inv].to(torch.int32)
    elif grid is not None:
        g_idx = col_group.to(torch.int32)
    return ObsResult(
        weight=w, mask=mask if prune else None, scale=scale, zero=zero, g_idx=g_idx, loss=float(losses.sum()), damp=damp
    )
