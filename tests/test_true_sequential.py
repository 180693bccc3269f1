"""``true_sequential`` off (the SparseGPT / Wanda reference code's order; SparseGPT's default when it only prunes, AWQ's
with GPTQ rounding): every group of a decoder layer is
compressed from statistics of the *dense* layer's inputs; on (GPTQ's order) from the layer with the groups
before it already compressed."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_loaded

from recoup.compress import CompressConfig, compress, engine
from recoup.compress.stats import ActNormStats, BlockIOStats, HessianStats
from recoup.data.calibration import Calibration
from recoup.model import streamer
from recoup.model.anatomy import anatomy

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "opt", "gpt2"]


def calib(n=6, t=24, seed=0) -> Calibration:
    ids = torch.randint(4, 100, (n, t), generator=torch.Generator().manual_seed(seed))
    return Calibration(input_ids=ids, corpus="random", split="train", seqlen=t, seed=seed)


ORIGINAL_COMPRESS_GROUPS = engine._compress_groups


def _stat(s) -> torch.Tensor:
    if isinstance(s, BlockIOStats):  # AWQ + GPTQ: the X^T X it keeps for GPTQ (which rounds on it divided by s s^T)
        s = s.hessian
    return s.xtx.clone() if isinstance(s, HessianStats) else s.sq.clone()


def compressed_stats(lm, cfg: dict, monkeypatch) -> dict[tuple[str, ...], torch.Tensor]:
    """Layer 0's statistics per group, as the engine handed them to the method."""
    seen = {}
    orig = ORIGINAL_COMPRESS_GROUPS

    def spy(i, view, method, pairs, config, linears):
        if i == 0:
            seen.update({names: _stat(stats) for names, stats in pairs})
        return orig(i, view, method, pairs, config, linears)

    monkeypatch.setattr(engine, "_compress_groups", spy)
    compress(lm, CompressConfig.from_dict({**cfg, "batch_size": 4}), calib())
    return seen


def dense_stats(model, kind, batch_size: int = 4) -> dict[tuple[str, ...], torch.Tensor]:
    """Layer 0's statistics per group from the dense model, every group observed on the same dense forward."""
    anat = anatomy(model)
    inps, recs = streamer.capture_inputs(model, anat, calib().input_ids, batch_size)
    layer = anat.layers[0]
    out = {}
    for names in anat.spec.sequential:
        cols = anat.weight_matrix(engine._get(layer, names[0])).shape[1]
        stats = kind(cols)
        first = engine._get(layer, names[0])
        with streamer.hooked(first.register_forward_pre_hook(lambda _m, a: stats.add(a[0].detach()))):
            for s in range(0, inps.shape[0], batch_size):
                streamer.call_layer(layer, inps[s : s + batch_size], recs[0])
        out[tuple(names)] = _stat(stats)
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "cfg,kind",
    [
        (dict(method="sparsegpt", sparsity=0.5), HessianStats),
        (dict(method="wanda", sparsity=0.5), ActNormStats),
        (dict(method="awq", bits=3, group_size=16, grid=3, rounding="gptq"), HessianStats),
    ],
    ids=["sparsegpt", "wanda", "awq-gptq"],
)
def test_true_sequential_off_takes_every_group_from_the_dense_layer(arch, cfg, kind, monkeypatch):
    lm = tiny_loaded(arch, hidden=32, layers=2)
    ref = dense_stats(copy.deepcopy(lm.model), kind)
    off = compressed_stats(copy.deepcopy(lm), {**cfg, "true_sequential": False}, monkeypatch)
    on = compressed_stats(lm, {**cfg, "true_sequential": True}, monkeypatch)
    assert off.keys() == ref.keys() == on.keys()
    for names in ref:
        assert torch.equal(off[names], ref[names]), names  # the same forward, batches and sums: bitwise
    first = tuple(anatomy(lm.model).spec.sequential[0])
    assert torch.equal(on[first], ref[first])  # the first group sees the layer's inputs either way
    later = [n for n in ref if n != first]
    assert later and all(not torch.allclose(on[n], ref[n]) for n in later)  # later groups see compressed ones


def test_true_sequential_defaults():
    assert CompressConfig.from_dict(dict(method="sparsegpt", sparsity=0.5)).options.true_sequential is False
    joint = CompressConfig.from_dict(dict(method="sparsegpt", sparsity=0.5, bits=4, group_size=16))
    assert joint.options.true_sequential is True and joint.to_dict()["true_sequential"] is True  # recorded resolved
    forced = dict(method="sparsegpt", sparsity=0.5, bits=4, true_sequential=False)
    assert CompressConfig.from_dict(forced).options.true_sequential is False
    assert CompressConfig.from_dict(dict(method="wanda", sparsity=0.5)).options.true_sequential is True
    assert CompressConfig.from_dict(dict(method="gptq", bits=4)).options.true_sequential is True
    awq = dict(method="awq", bits=3, group_size=16)
    assert CompressConfig.from_dict(awq).options.true_sequential is True  # AWQ alone: true-sequential (measured better)
    gptq_rounded = CompressConfig.from_dict({**awq, "rounding": "gptq"})  # AWQ + GPTQ: the dense layer's order
    assert gptq_rounded.options.true_sequential is False and gptq_rounded.to_dict()["true_sequential"] is False
    assert (
        CompressConfig.from_dict({**awq, "rounding": "gptq", "true_sequential": True}).options.true_sequential is True
    )
