"""The one-forward-per-layer engine gives bitwise the weights of the re-run-per-group path, every architecture.

Why bitwise and not just close: the parked forwards run the same kernels on the same batches with the
same (already compressed) weights as a re-run does, one thread at a time and in batch order, so every
statistic is summed in the same order."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_loaded

from recoup.compress import CompressConfig, compress
from recoup.compress.onepass import parked_bytes
from recoup.data.calibration import Calibration
from recoup.model.anatomy import anatomy

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "opt", "gpt2"]


def calib(n=6, t=24, seed=0) -> Calibration:
    ids = torch.randint(4, 100, (n, t), generator=torch.Generator().manual_seed(seed))
    return Calibration(input_ids=ids, corpus="random", split="train", seqlen=t, seed=seed)


def run(arch: str, cfg: dict, budget: int | None):
    lm = tiny_loaded(arch, hidden=32, layers=3)
    anat = anatomy(lm.model)
    first = anat.linears(anat.layers[1])[anat.spec.sequential[0][0]]
    calls = []
    handle = first.register_forward_hook(lambda *a: calls.append(1))
    rep = compress(lm, CompressConfig.from_dict({**cfg, "batch_size": 4, "activation_budget_mb": budget}), calib())
    handle.remove()
    # 6 windows in batches of 4: 2 forwards of layer 1 (plus its one record pass) on the single-pass path
    assert len(calls) == (3 if budget is None else 2 * len(anat.spec.sequential) + 1)
    return {n: anat.weight_matrix(m).detach().clone() for n, m in anat.iter_linears()}, rep, lm


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "cfg",
    [
        dict(method="sparsegpt", sparsity=0.5, bits=4, group_size=16, true_sequential=True),
        dict(method="gptq", bits=3, group_size=16),
        dict(method="wanda", pattern="2:4", true_sequential=True),
    ],
    ids=["joint", "gptq", "wanda"],
)
def test_one_forward_per_layer_is_bitwise_the_rerun_path(arch, cfg):
    once, rep_once, lm_once = run(arch, cfg, None)  # tiny: always fits the default budget
    rerun, rep_rerun, lm_rerun = run(arch, cfg, 0)  # budget 0: re-run each layer per group
    assert once.keys() == rerun.keys()
    for name in once:
        assert torch.equal(once[name], rerun[name]), name
    assert [r.error for r in rep_once.linears] == [r.error for r in rep_rerun.linears]
    x = calib(2, 16, seed=1).input_ids
    assert torch.equal(lm_once.model(x).logits, lm_rerun.model(x).logits)


def test_parked_bytes_counts_every_group_input():
    # llama-7b at 128 x 2048 in fp16: residual + input (2 x 4096) + q, o, gate/up (4096 each) + down (11008)
    assert parked_bytes(128 * 2048, 4096, [4096, 4096, 4096, 11008], 2) == 128 * 2048 * 2 * (8192 + 23296)


@pytest.mark.parametrize("targets", ["mlp", "attention"])
def test_one_forward_per_layer_with_a_subset_of_groups(targets):
    cfg = dict(method="sparsegpt", sparsity=0.5, targets=targets, true_sequential=True)
    lm_a, lm_b = tiny_loaded("qwen3", hidden=32, layers=2), tiny_loaded("qwen3", hidden=32, layers=2)
    compress(lm_a, CompressConfig.from_dict({**cfg, "batch_size": 4}), calib())
    compress(lm_b, CompressConfig.from_dict({**cfg, "batch_size": 4, "activation_budget_mb": 0}), calib())
    for (name, a), (_, b) in zip(anatomy(lm_a.model).iter_linears(), anatomy(lm_b.model).iter_linears()):
        assert torch.equal(a.weight, b.weight), name


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("path", ["once", "rerun", "dense-order"])
def test_the_last_layer_is_not_run_past_its_last_group(arch, path):
    """Nothing reads the last layer's output, so no path runs it past its last group's first linear on the
    calibration batches: there that linear runs only in the one-window pass that records the layers'
    arguments, while every earlier layer also runs it to propagate. The weights are the ones the last
    layer's statistics give, the same whether or not its forward finishes (the tests above)."""
    cfg = dict(
        method="sparsegpt",
        sparsity=0.5,
        batch_size=4,
        true_sequential=path != "dense-order",
        activation_budget_mb=0 if path == "rerun" else None,
    )
    lm = tiny_loaded(arch, hidden=32, layers=3)
    anat = anatomy(lm.model)
    last_first = anat.spec.sequential[-1][0]
    counts = [0] * len(anat.layers)
    handles = [
        anat.linears(layer)[last_first].register_forward_hook(lambda *a, i=i: counts.__setitem__(i, counts[i] + 1))
        for i, layer in enumerate(anat.layers)
    ]
    compress(lm, CompressConfig.from_dict(cfg), calib())
    for h in handles:
        h.remove()
    assert counts[-1] == 1  # the record pass
    assert all(c >= 3 for c in counts[:-1])  # and 6 windows in batches of 4: the propagating forward's 2 calls


@pytest.mark.parametrize(
    "cfg, batch",
    [
        (dict(method="sparsegpt", sparsity=0.5), 1),  # its reference order: each layer straight through
        (dict(method="gptq", bits=4, group_size=16), 8),  # one forward per layer: each batch a parked thread
        (dict(method="gptq", bits=4, group_size=16, activation_budget_mb=0), 1),  # re-run per group
        (dict(method="gptq", bits=4, group_size=16, batch_size=3), 3),  # asked for
    ],
)
def test_default_batch_size_follows_the_path_and_is_recorded(cfg, batch):
    lm = tiny_loaded("llama", hidden=32, layers=2)
    anat = anatomy(lm.model)
    first = anat.linears(anat.layers[1])[anat.spec.sequential[0][0]]
    sizes = []
    handle = first.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    config = CompressConfig.from_dict(cfg)
    rep = compress(lm, config, calib(n=12))
    handle.remove()
    assert rep.config["batch_size"] == batch
    assert config.batch_size == cfg.get("batch_size")  # the caller's config is left as it was
    assert max(sizes) == batch  # the record pass runs one window; every calibration forward at most `batch`


@pytest.mark.parametrize("bad", [0, -1, True, 2.0])
def test_batch_size_must_be_a_positive_whole_number(bad):
    from recoup.errors import RecoupError

    with pytest.raises((RecoupError, ValueError), match="batch_size"):
        CompressConfig.from_dict(dict(method="gptq", bits=4, batch_size=bad))
