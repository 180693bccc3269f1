"""The OBS column loop is bitwise the straightforward one (GPTQ / SparseGPT reference style: each column's
error applied to every column from it on, the compressed column copied out per step), and the damped inverse
factor shared through ``factors`` changes nothing."""

from __future__ import annotations

import pytest
import torch

from recoup.artifact.grid import QuantGrid
from recoup.compress.obs import damped_inverse_cholesky, obs_compress, single_thread
from recoup.compress.stats import HessianStats


def straightforward(w, h, *, sparsity=0.0, nm=None, grid=None, blocksize=16, percdamp=0.01):
    """Per-column loop as the reference code writes it (no act-order; groups fitted when they start)."""
    w, h = w.clone(), h.clone()
    rows, cols = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    gsize = (grid.group_size or cols) if grid else cols
    scale = torch.zeros(rows, -(-cols // gsize))
    zero = torch.zeros_like(scale)
    hinv, _ = damped_inverse_cholesky(h, percdamp)
    prune = nm is not None or sparsity > 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
        d1 = torch.diag(hinv1)
        mask1 = torch.zeros_like(w1, dtype=torch.bool)
        if prune and nm is None:
            score = w1**2 / d1[None, :] ** 2
            mask1.view(-1)[torch.topk(score.flatten(), int(score.numel() * sparsity), largest=False).indices] = True
        for i in range(i2 - i1):
            col, wc, d = i1 + i, w1[:, i], hinv1[i, i]
            if nm is not None and i % nm[1] == 0:
                score = w1[:, i : i + nm[1]] ** 2 / d1[i : i + nm[1]][None, :] ** 2
                mask1[:, i : i + nm[1]].scatter_(
                    1, torch.topk(score, nm[1] - nm[0], dim=1, largest=False).indices, True
                )
            q = wc.clone()
            q[mask1[:, i]] = 0
            if grid is not None:
                g = col // gsize
                if col % gsize == 0:
                    ahead = torch.cat([w1[:, i:].masked_fill(mask1[:, i:], 0), w[:, i2:]], dim=1)[:, :gsize]
                    scale[:, g], zero[:, g] = grid.fit(ahead)
                keep = ~mask1[:, i] if prune else None
                q = grid.quantize(
                    q[:, None], scale[:, g], zero[:, g], keep_nonzero=None if keep is None else keep[:, None]
                )[:, 0]
                if prune:
                    q[mask1[:, i]] = 0
            q1[:, i] = q
            err = (wc - q) / d
            w1[:, i:] -= err[:, None] @ hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w


def _problem(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols, generator=g) * (torch.rand(cols, generator=g) * 3 + 0.1)
    x[:, 3] = 0  # a dead input column
    w = torch.round(torch.randn(rows, cols, generator=g) * 4) / 4  # ties, as in weights dequantized from a grid
    return w, 2 / x.shape[0] * x.t() @ x


@pytest.mark.parametrize("kind", ["sparse", "2:4", "w4", "w3-asym", "sparse+w4", "2:4+w4"])
@pytest.mark.parametrize("shape", [(24, 40), (37, 64)])
def test_obs_loop_is_bitwise_the_straightforward_loop(kind, shape):
    w, h = _problem(*shape)
    kw = {
        "sparse": {"sparsity": 0.5},
        "2:4": {"nm": (2, 4)},
        "w4": {"grid": QuantGrid(bits=4, group_size=16)},
        "w3-asym": {"grid": QuantGrid(bits=3, group_size=16, sym=False)},
        "sparse+w4": {"sparsity": 0.5, "grid": QuantGrid(bits=4, group_size=16)},
        "2:4+w4": {"nm": (2, 4), "grid": QuantGrid(bits=4, group_size=16)},
    }[kind]
    got = obs_compress(w, h, blocksize=16, **kw).weight
    with single_thread():  # obs_compress runs on one thread by design; with more, a matmul may sum in another order
        want = straightforward(w, h, blocksize=16, **kw)
    assert torch.equal(got, want)


@pytest.mark.parametrize("act_order", [False, True])
def test_shared_factor_changes_nothing_and_is_dropped_when_the_hessian_grows(act_order):
    stats = HessianStats(48)
    g = torch.Generator().manual_seed(1)
    stats.add(torch.randn(200, 48, generator=g))
    grid = QuantGrid(bits=4, group_size=16)
    ws = [torch.randn(r, 48, generator=g) for r in (20, 33, 20)]
    alone = [
        obs_compress(w, stats.hessian(), grid=grid, blocksize=16, act_order=act_order, static_groups=act_order)
        for w in ws
    ]
    shared = [
        obs_compress(
            w,
            stats.hessian(),
            grid=grid,
            blocksize=16,
            act_order=act_order,
            static_groups=act_order,
            factors=stats.factors,
        )
        for w in ws
    ]
    assert len(stats.factors) == 1
    for a, b in zip(alone, shared):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.scale, b.scale) and a.damp == b.damp
    stats.add(torch.randn(50, 48, generator=g))
    assert stats.factors == {}
    assert not torch.equal(
        obs_compress(ws[0], stats.hessian(), grid=grid, blocksize=16, factors=stats.factors).weight, alone[0].weight
    )
