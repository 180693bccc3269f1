"""Pure tensor math of compression: grids, masks, statistics and the blocked OBS update."""

from __future__ import annotations

import logging

import pytest
import torch

from recoup.artifact.grid import QuantGrid, grid_deviation
from recoup.compress.masks import is_nm, nm_mask, unstructured_mask
from recoup.compress.methods.rtn import rtn
from recoup.compress.obs import damped_inverse_cholesky, obs_compress
from recoup.compress.stats import ActNormStats, HessianStats
from recoup.errors import RecoupError


def outlier_data(rows=16, cols=32, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g) @ torch.randn(cols, cols, generator=g)  # correlated inputs
    x[:, :3] *= 25.0  # a few outlier input channels, as in LLM activations
    w = torch.randn(rows, cols, generator=g)
    return w, x


def out_err(w0, w1, x):
    return float(((x @ (w1 - w0).t()) ** 2).sum())


def test_incremental_hessian_equals_batch():
    x = torch.randn(6, 10, 24)
    inc = HessianStats(24)
    for chunk in x.split(2):
        inc.add(chunk)
    batch = HessianStats(24)
    batch.add(x)
    flat = x.reshape(-1, 24)
    assert inc.count == batch.count == 60
    torch.testing.assert_close(inc.hessian(), batch.hessian(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch.hessian(), 2 / 60 * flat.t() @ flat, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cols", [24, 256, 301])
def test_blocked_hessian_is_the_symmetric_full_product(cols):
    """At >= BLOCKED_FROM columns only the lower block triangle is multiplied; xtx must still be the full
    X^T X (float rounding apart), exactly symmetric, and its products must cover the triangle."""
    x = torch.randn(5, 40, cols)
    h = HessianStats(cols)
    for chunk in x.split(2):
        h.add(chunk)
    flat = x.reshape(-1, cols).double()
    torch.testing.assert_close(h.xtx.double(), flat.t() @ flat, rtol=1e-5, atol=1e-3)
    assert torch.equal(h.xtx, h.xtx.t())
    products = h.products(200)
    assert sum(m for m, _, _ in products) == cols and all(k == 200 for _, k, _ in products)
    work = sum(m * n for m, _, n in products)
    assert work == cols * cols if cols < HessianStats.BLOCKED_FROM else work < 0.7 * cols * cols


@pytest.mark.parametrize("cols", [24, 301])
def test_hessian_read_midway_then_added_to_is_the_same_and_holds_one_matrix(cols):
    """Reading xtx keeps one (cols, cols) matrix (its mirror), not the accumulator beside it; adding after a read
    continues from the mirror, and the result is bitwise that of adding everything first."""
    x = torch.randn(4, 40, cols, generator=torch.Generator().manual_seed(1))
    once, midway = HessianStats(cols), HessianStats(cols)
    for chunk in x.split(2):
        once.add(chunk)
    midway.add(x[:2])
    first = midway.xtx.clone()
    big = [t for t in (midway._acc, midway._full) if t is not None]
    assert len(big) == 1
    midway.add(x[2:])
    assert torch.equal(midway.xtx, once.xtx) and not torch.equal(first, once.xtx)


def test_act_norms_are_column_l2_norms():
    x = torch.randn(3, 7, 5)
    s = ActNormStats(5)
    s.add(x[:1])
    s.add(x[1:])
    torch.testing.assert_close(s.norms(), x.reshape(-1, 5).norm(dim=0))


@pytest.mark.parametrize("bits,sym,group", [(2, True, 8), (3, True, 10), (4, False, 7), (8, True, None)])
def test_rtn_puts_every_weight_on_its_grid_with_ragged_groups(bits, sym, group):
    w = torch.randn(6, 24) * 3
    grid = QuantGrid(bits, sym, group)
    res = rtn(w, grid)
    assert res.scale.shape == (6, grid.num_groups(24))
    assert grid_deviation(res.weight, res.scale, res.zero, res.g_idx, grid.maxq) < 1e-4
    levels = [torch.unique(res.weight[r, res.g_idx == g]).numel() for r in range(6) for g in range(res.scale.shape[1])]
    assert max(levels) <= 2**bits
    assert grid_deviation(w, res.scale, res.zero, res.g_idx, grid.maxq) > 1e-3  # the raw weights are not


def test_zero_is_on_every_grid_and_keep_nonzero_avoids_it():
    grid = QuantGrid(4, True, None)
    w = torch.tensor([[0.01, -0.01, 1.0, -0.9]])
    s, z = grid.fit(w)
    q = grid.quantize(w, s, z)
    assert q[0, 0] == 0 and q[0, 1] == 0  # small weights round to exact zero
    q2 = grid.quantize(w, s, z, keep_nonzero=torch.ones_like(w, dtype=torch.bool))
    assert (q2 != 0).all() and q2[0, 0] > 0 and q2[0, 1] < 0


@pytest.mark.parametrize("sym", [True, False])
def test_mse_range_search_never_worse_than_minmax_and_keeps_zero(sym):
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    w[:, 3] *= 8  # an outlier column: min/max wastes levels on it, a shrunk range helps most rows
    for bits in (3, 4):
        plain, mse = QuantGrid(bits, sym, 32), QuantGrid(bits, sym, 32, search="mse")
        for g in range(2):
            block = w[:, g * 32 : (g + 1) * 32]
            e_plain = (plain.quantize(block, *plain.fit(block)) - block).abs().pow(2.4).sum(1)
            s, z = mse.fit(block)
            e_mse = (mse.quantize(block, s, z) - block).abs().pow(2.4).sum(1)
            assert (e_mse <= e_plain + 1e-6).all()
            assert mse.quantize(torch.zeros(32, 1), s, z).abs().max() == 0  # exact zero stays on the grid
        res_plain, res_mse = rtn(w, plain), rtn(w, mse)
        assert grid_deviation(res_mse.weight, res_mse.scale, res_mse.zero, res_mse.g_idx, mse.maxq) < 1e-4
        assert (res_mse.weight - w).pow(2).sum() < (res_plain.weight - w).pow(2).sum()
    with pytest.raises(ValueError, match="search must be one of"):
        QuantGrid(4, True, 32, search="l1")


def test_masks_are_exact():
    score = torch.randn(8, 16)
    m = unstructured_mask(score, 0.5)
    assert int(m.sum()) == 64
    r = unstructured_mask(score, 0.25, per_row=True)
    assert (r.sum(1) == 4).all()
    ties = unstructured_mask(torch.ones(4, 4), 0.5)
    assert int(ties.sum()) == 8
    for n, mm in [(1, 2), (2, 4), (4, 8)]:
        nm = nm_mask(score, n, mm)
        assert is_nm(score.masked_fill(nm, 0), n, mm)
        assert (nm.reshape(8, -1, mm).sum(2) == mm - n).all()


def test_sparsegpt_exact_sparsity_and_beats_magnitude_on_outliers():
    w, x = outlier_data()
    h = 2 / x.shape[0] * x.t() @ x
    res = obs_compress(w, h, sparsity=0.5, blocksize=8)
    assert int((res.weight == 0).sum()) == w.numel() // 2
    assert torch.equal(res.weight == 0, res.mask)
    mag = w.masked_fill(unstructured_mask(w.abs(), 0.5), 0)
    assert out_err(w, res.weight, x) < out_err(w, mag, x)


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (4, 8)])
def test_sparsegpt_nm(n, m):
    w, x = outlier_data()
    res = obs_compress(w, 2 / 512 * x.t() @ x, nm=(n, m), blocksize=16)
    rows, cols = w.shape
    assert ((res.weight != 0).reshape(rows, cols // m, m).sum(2) == n).all()


@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True)])
def test_gptq_error_below_rtn_on_outlier_channels(act_order, static):
    w, x = outlier_data(seed=1)
    h = 2 / x.shape[0] * x.t() @ x
    grid = QuantGrid(3, True, 8)
    res = obs_compress(w, h, grid=grid, blocksize=8, act_order=act_order, static_groups=static)
    assert grid_deviation(res.weight, res.scale, res.zero, res.g_idx, grid.maxq) < 1e-4
    base = rtn(w, grid)
    assert out_err(w, res.weight, x) < out_err(w, base.weight, x)


def test_joint_sparse_quantized_exact_zeros_and_grid():
    w, x = outlier_data(rows=16, cols=64, seed=2)
    grid = QuantGrid(4, True, 16)
    res = obs_compress(w, 2 / 512 * x.t() @ x, sparsity=0.5, grid=grid, blocksize=32)
    assert int((res.weight == 0).sum()) == w.numel() // 2
    assert torch.equal(res.weight == 0, res.mask)
    assert grid_deviation(res.weight, res.scale, res.zero, res.g_idx, grid.maxq) < 1e-4


def test_indefinite_hessian_raises_damping_and_logs(caplog):
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))
    h = q @ torch.diag(torch.tensor([1.0] * 7 + [-0.05])) @ q.t()  # one negative eigenvalue
    with caplog.at_level(logging.WARNING):
        upper, damp = damped_inverse_cholesky(h, 1e-3)
    assert damp == pytest.approx(0.1) and "retrying" in caplog.text
    assert torch.isfinite(upper).all()


def test_awq_clip_never_worse_than_no_clip_and_never_grows_weights():
    from recoup.compress.methods.awq import awq_clip

    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 40, generator=g)
    w[:, 3] *= 8  # outlier column: clipping pays off in its group
    x = torch.randn(256, 40, generator=g)
    grid = QuantGrid(3, False, 16)  # 40 columns: groups of 16, 16, 8 (ragged)
    clipped = awq_clip(w, x, grid)
    assert (clipped.abs() <= w.abs() + 1e-7).all() and not torch.equal(clipped, w)

    def group_err(v):  # per (row, group) mean squared partial output of the quantized weight
        q = grid.quantize_matrix(v)[0]
        return torch.stack([((x[:, s : s + 16] @ (q - w)[:, s : s + 16].t()) ** 2).mean(0) for s in (0, 16, 32)], 1)

    assert (group_err(clipped) <= group_err(w) + 1e-6).all()


def test_awq_scale_candidates_start_at_identity():
    from recoup.compress.methods.awq import scale_candidates

    x_mean, w_mean = torch.rand(32) + 0.1, torch.rand(32) + 0.1
    for w in (None, w_mean):
        cands = scale_candidates(x_mean, w, 20)
        assert len(cands) == 20 and cands[0][0] == 0.0 and torch.allclose(cands[0][1], torch.ones(32))
        assert cands[-1][0] == 1.0


@pytest.mark.parametrize("block_tokens, kept", [(None, 8), (64, 2), (1, 1), (10_000, 8)])
def test_awq_block_calls_kept_all_by_default_or_spread_up_to_the_cap(block_tokens, kept):
    from recoup.compress.stats import BlockIOStats

    stats = BlockIOStats(6, 16, calls=8, block_tokens=block_tokens)
    xs = [torch.full((2, 16, 6), float(i)) for i in range(8)]  # 8 calls of 32 tokens
    for x in xs:
        stats.add_call((x,), {})
    assert len(stats.inputs) == kept
    seen = [int(a[0][0, 0, 0]) for a, _ in stats.inputs]
    assert seen == sorted(set(seen)) and (kept == 1 or seen[-1] >= 4)  # spread over the set, not the first calls


def test_awq_gptq_rounding_uses_the_hessian_of_the_rescaled_inputs():
    """AWQ's ``rounding="gptq"``: the group's weights read x / s after the fold, so GPTQ must run on the Hessian of
    x / s; computed from x's Hessian, it equals GPTQ on a Hessian accumulated from x / s directly."""
    from recoup.compress import CompressConfig
    from recoup.compress.methods.awq import METHOD
    from recoup.compress.methods.gptq import gptq
    from recoup.compress.stats import BlockIOStats, HessianStats

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, 40, generator=g) * (torch.rand(40, generator=g) * 4 + 0.1)
    s = torch.rand(40, generator=g) * 3 + 0.2
    w = torch.randn(24, 40, generator=g)
    stats, direct = BlockIOStats(40, 64, calls=4, hessian=True), HessianStats(40)
    for xb in x:
        stats.add(xb)
        direct.add(xb / s)
    stats.input_scale = s
    cfg = CompressConfig.from_dict(dict(method="awq", bits=3, group_size=16, rounding="gptq"))
    got = METHOD.compress_linear(w, stats, cfg)
    want = gptq(w, direct.hessian(), CompressConfig(method="gptq", bits=3, group_size=16))
    assert torch.allclose(got.weight, want.weight, atol=1e-5) and got.info["awq_rounding"] == "gptq"
    rtn = METHOD.compress_linear(w, stats, CompressConfig.from_dict(dict(method="awq", bits=3, group_size=16)))
    err = lambda v: float((((v - w) @ direct.xtx) * (v - w)).sum())  # noqa: E731  output error on x / s
    assert err(got.weight) < err(rtn.weight)
    with pytest.raises(RecoupError, match="rounding must be rtn or gptq"):
        CompressConfig.from_dict(dict(method="awq", bits=3, rounding="nearest"))


def test_damped_inverse_cholesky_is_the_textbook_expression_bitwise():
    """The damping is added to the diagonal in place and each intermediate freed as soon as it is used (two
    (cols, cols) matrices at a time instead of six): the factor is bitwise the textbook expression's."""
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(0))
    h = x.t() @ x
    h[5, :] = h[:, 5] = 0  # a dead column, as a zero-input feature gives
    h[5, 5] = 1
    upper, damp = damped_inverse_cholesky(h, 0.01)
    eye = torch.eye(64)
    ref = torch.linalg.cholesky(
        torch.cholesky_inverse(torch.linalg.cholesky(h + eye * (0.01 * float(h.diag().mean())))), upper=True
    )
    assert damp == 0.01 and torch.equal(upper, ref)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("mode", ["gptq", "sparsegpt-4bit"])
def test_obs_reads_the_unscaled_hessian_bitwise(mode, act_order):
    """GPTQ and SparseGPT read X^T X and 2/n apart (no scaled (cols, cols) copy per linear): the result is
    bitwise the one from the scaled Hessian, with a dead column, act order on and off."""
    g = torch.Generator().manual_seed(3)
    stats = HessianStats(48)
    for _ in range(3):
        x = torch.randn(40, 48, generator=g)
        x[:, 7] = 0
        stats.add(x)
    w = torch.randn(20, 48, generator=g)
    grid = QuantGrid(bits=4, group_size=16, sym=False)
    keys = dict(grid=grid, act_order=act_order) if mode == "gptq" else dict(grid=grid, sparsity=0.5)
    want = obs_compress(w, stats.hessian(), **keys)
    got = obs_compress(w, stats.xtx, hessian_scale=stats.hessian_scale, **keys)
    assert torch.equal(got.weight, want.weight) and got.damp == want.damp and got.loss == want.loss
    assert torch.equal(got.scale, want.scale) and torch.equal(got.zero, want.zero)
