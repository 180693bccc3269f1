"""The sequential engine and artifacts on tiny random models of every architecture in the anatomy map."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_loaded

from recoup.artifact import load_model
from recoup.artifact.fingerprint import compression_fingerprint
from recoup.artifact.grid import QuantGrid
from recoup.artifact.store import load_artifact, save_artifact
from recoup.compress import CompressConfig, compress
from recoup.compress.engine import LayerView
from recoup.compress.masks import is_nm
from recoup.compress.methods.awq import PRECEDING_OP, _fold
from recoup.data.calibration import Calibration
from recoup.errors import RecoupError
from recoup.model.anatomy import anatomy
from recoup.model.streamer import call_layer, capture_inputs

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "opt", "gpt2"]


def calib(n=8, t=32, seed=0) -> Calibration:
    ids = torch.randint(4, 100, (n, t), generator=torch.Generator().manual_seed(seed))
    return Calibration(input_ids=ids, corpus="random", split="train", seqlen=t, seed=seed)


def weights(model):
    anat = anatomy(model)
    return {n: anat.weight_matrix(m).detach().clone() for n, m in anat.iter_linears()}


@pytest.mark.parametrize("arch", ARCHS)
def test_joint_sparse_quantized_every_arch(arch):
    lm = tiny_loaded(arch, hidden=32, layers=2)
    rep = compress(lm, CompressConfig(method="sparsegpt", sparsity=0.5, bits=4, group_size=16), calib())
    fp = compression_fingerprint(lm.model, rep.to_dict(), rep.qparams)
    assert fp["all_on_grid"] is True
    for name, w in weights(lm.model).items():
        assert int((w == 0).sum()) == w.numel() // 2, name  # exactly the pruned half, no extra zeros
    assert len(rep.linears) == len(list(anatomy(lm.model).iter_linears()))
    assert all(r.error_kind == "output" and r.error >= 0 for r in rep.linears)


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_nm_every_pruner(arch, method):
    lm = tiny_loaded(arch, hidden=32, layers=2)
    compress(lm, CompressConfig(method=method, pattern="2:4"), calib())
    for name, w in weights(lm.model).items():
        assert is_nm(w, 2, 4), name
        assert float((w == 0).float().mean()) == 0.5


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "opt", "gpt2"])
def test_quantizers_put_every_weight_on_grid(arch, method):
    lm = tiny_loaded(arch, hidden=48, layers=2)  # 48 columns, group 32: ragged last group
    rep = compress(lm, CompressConfig(method=method, bits=3, group_size=32, sym=False), calib())
    fp = compression_fingerprint(lm.model, rep.to_dict(), rep.qparams)
    assert fp["all_on_grid"] is True
    assert set(fp["linears"]) == set(rep.qparams)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "opt", "gpt2"])
def test_awq_rounded_by_gptq_is_on_grid_every_arch_and_beats_rounding_to_nearest(arch):
    """AWQ + GPTQ (``rounding="gptq"``), in its default order (the dense layer's) and true-sequential: every weight on
    its grid (the qparams are GPTQ's), no clipping search, and, on held-out windows, the model's logits closer to the
    dense model's than AWQ's own round-to-nearest."""
    cal, held = calib(n=16), calib(n=16, seed=1)
    errs = {}
    runs = (("rtn", "rtn", {}), ("gptq", "gptq", {}), ("gptq-seq", "gptq", {"true_sequential": True}))
    for run, rounding, order in runs:
        lm = tiny_loaded(arch, hidden=48, layers=2)
        ref = lm.model(held.input_ids).logits.detach()
        rep = compress(
            lm,
            CompressConfig.from_dict(dict(method="awq", bits=3, group_size=16, grid=6, rounding=rounding, **order)),
            cal,
        )
        fp = compression_fingerprint(lm.model, rep.to_dict(), rep.qparams)
        assert fp["all_on_grid"] is True and set(fp["linears"]) == set(rep.qparams)
        assert all((r.info.get("awq_rounding") == "gptq") == (rounding == "gptq") for r in rep.linears)
        assert all(("awq_clip" in r.info) == (rounding == "rtn") for r in rep.linears)  # no clipping search
        errs[run] = float(((lm.model(held.input_ids).logits - ref) ** 2).mean().detach())
    assert errs["gptq"] < errs["rtn"] and errs["gptq-seq"] < errs["rtn"], errs


def test_gptq_and_sparsegpt_reduce_output_error_vs_baselines():
    cal = calib(n=16)
    errs = {}
    for cfg in [
        dict(method="rtn", bits=3, group_size=16),
        dict(method="gptq", bits=3, group_size=16),
        dict(method="magnitude", sparsity=0.5),
        dict(method="sparsegpt", sparsity=0.5),
    ]:
        lm = tiny_loaded("llama", hidden=32, layers=2)
        x = cal.input_ids
        ref = lm.model(x).logits.detach()
        compress(lm, CompressConfig(**cfg), cal)
        errs[cfg["method"]] = float(((lm.model(x).logits - ref) ** 2).mean().detach())
    assert errs["gptq"] < errs["rtn"]
    assert errs["sparsegpt"] < errs["magnitude"]


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "opt", "gpt2"])
def test_awq_scale_folding_preserves_the_function(arch):
    lm = tiny_loaded(arch, hidden=32, layers=1)
    anat = anatomy(lm.model)
    layer = anat.layers[0]
    inps, recs = capture_inputs(lm.model, anat, calib().input_ids, 4)
    before = call_layer(layer, inps, recs[0])
    view = LayerView(layer, anat, anat.linear_names())
    folded = 0
    for names in anat.spec.sequential:
        prev = PRECEDING_OP[anat.model_type].get(names)
        weights = [view.get_weight(n) for n in names]
        if prev is None or (prev in view.linear_names and view.get_weight(prev).shape[0] != weights[0].shape[1]):
            continue
        s = torch.rand(weights[0].shape[1], generator=torch.Generator().manual_seed(folded)) * 4 + 0.25
        _fold(view, names, weights, prev, s, QuantGrid(3, True, 16))
        folded += 1
    assert folded >= 2
    after = call_layer(layer, inps, recs[0])
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_artifact_reload_gives_identical_logits_and_fingerprint(tmp_path):
    lm = tiny_loaded("gpt2", hidden=32, layers=2)
    rep = compress(lm, CompressConfig(method="sparsegpt", pattern="2:4", bits=4, group_size=16), calib())
    out = save_artifact(lm, rep, tmp_path / "art")
    again = load_model(str(out))
    assert again.manifest["recipe"]["pattern"] == "2:4" and again.manifest["calibration"]["nsamples"] == 8
    x = torch.randint(4, 100, (2, 20))
    assert torch.equal(lm.model(x).logits, again.model(x).logits)
    fp = compression_fingerprint(again.model, again.manifest)
    assert fp["digest"] == compression_fingerprint(lm.model, rep.to_dict(), rep.qparams)["digest"]
    assert fp["all_on_grid"] is True
    for name, w in weights(again.model).items():  # N:M checked from the saved artifact
        assert is_nm(w, 2, 4), name
    # a changed weight changes the fingerprint
    anat = anatomy(again.model)
    first = next(anat.iter_linears())[1]
    with torch.no_grad():
        first.weight.view(-1)[torch.nonzero(first.weight.view(-1) == 0)[0]] = 0.123
    assert compression_fingerprint(again.model, again.manifest)["digest"] != fp["digest"]
    assert not (tmp_path / ".art.partial").exists()


def test_corrupted_and_foreign_artifacts_give_one_clear_line(tmp_path):
    lm = tiny_loaded("llama", hidden=32, layers=1)
    rep = compress(lm, CompressConfig(method="magnitude", sparsity=0.3), None)
    out = save_artifact(lm, rep, tmp_path / "a")
    with open(out / "model.safetensors", "r+b") as fh:
        fh.seek(-8, 2)
        fh.write(b"\x00garbage")
    with pytest.raises(RecoupError, match="corrupted: model.safetensors"):
        load_artifact(out)
    (out / "recoup.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(RecoupError, match="not a recoup compressed-model manifest"):
        load_model(str(out))
    (out / "recoup.json").write_text("{not json")
    with pytest.raises(RecoupError, match="not valid JSON"):
        load_model(str(out))
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("hi")
    with pytest.raises(RecoupError, match="refusing to overwrite"):
        save_artifact(lm, rep, other)


def test_engine_refusals():
    lm = tiny_loaded("llama", hidden=32, layers=1)
    with pytest.raises(RecoupError, match="group size 64 is larger than the input size 32"):
        compress(lm, CompressConfig(method="rtn", bits=4, group_size=64))
    with pytest.raises(RecoupError, match="needs calibration data"):
        compress(lm, CompressConfig(method="gptq", bits=4))


def test_targets_limit_what_is_touched():
    lm = tiny_loaded("llama", hidden=32, layers=2)
    before = weights(lm.model)
    rep = compress(lm, CompressConfig(method="wanda", sparsity=0.5, targets="mlp"), calib())
    after = weights(lm.model)
    assert all("mlp" in r.name for r in rep.linears)
    for name in before:
        assert torch.equal(before[name], after[name]) == ("self_attn" in name)


def test_many_layers_and_odd_hidden():
    lm = tiny_loaded("llama", hidden=24, layers=5)
    rep = compress(lm, CompressConfig(method="gptq", bits=2, group_size=16), calib(n=3, t=16))
    assert len({r.layer for r in rep.linears}) == 5
    assert compression_fingerprint(lm.model, rep.to_dict(), rep.qparams)["all_on_grid"] is True


def test_fingerprint_sees_through_peft_wrapped_linears():
    from peft import LoraConfig, get_peft_model

    lm = tiny_loaded("llama", hidden=32, layers=1)
    rep = compress(lm, CompressConfig(method="rtn", bits=4, group_size=16))
    before = compression_fingerprint(lm.model, rep.to_dict(), rep.qparams)
    wrapped = get_peft_model(lm.model, LoraConfig(target_modules=["q_proj", "down_proj"], r=2))
    after = compression_fingerprint(wrapped.base_model.model, rep.to_dict(), rep.qparams)
    assert after["digest"] == before["digest"] and after["all_on_grid"] is True


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_awq_searches_every_foldable_group_on_its_block_output(arch):
    """Every group with a foldable preceding op records its block's calls and searches; the chosen scale's block
    loss is at most the unscaled one (s = 1 is the first candidate); clipping ran on every linear but q/k."""
    lm = tiny_loaded(arch, hidden=32, layers=2)
    rep = compress(lm, CompressConfig.from_dict(dict(method="awq", bits=3, group_size=16, grid=6)), calib())
    anat = anatomy(lm.model)
    rel = {r.name: r.name[len(f"{anat.spec.layers}.{r.layer}.") :] for r in rep.linears}
    searched = {rel[r.name] for r in rep.linears if "awq_block_loss" in r.info}
    expected = {
        n
        for g, prev in PRECEDING_OP[arch].items()
        for n in g
        if not (
            prev in anat.linear_names()
            and anat.weight_matrix(anat.linears(anat.layers[0])[prev]).shape[0]
            != anat.weight_matrix(anat.linears(anat.layers[0])[g[0]]).shape[1]
        )
    }
    assert searched == expected and expected
    for r in rep.linears:
        if "awq_block_loss" in r.info:
            assert r.info["awq_block_loss"] <= r.info["awq_block_loss_unscaled"]
        assert ("q_proj" in r.name or "k_proj" in r.name) != (rel[r.name] in r.info["awq_clip"])


def test_a_layer_holds_one_linear_result_at_a_time(monkeypatch):
    """Once a linear's compressed weight is in the layer, the engine keeps no float32 copy of it (nor its mask):
    when the next linear starts, no earlier result's weight is alive, so a layer's peak is one linear's work."""
    import dataclasses
    import weakref

    from recoup.compress.methods import METHODS

    wanda = METHODS.get("wanda")
    earlier: list[weakref.ref] = []
    alive_at_start: list[int] = []

    def counting(weight, stats, config):
        alive_at_start.append(sum(ref() is not None for ref in earlier))
        res = wanda.compress_linear(weight, stats, config)
        earlier.extend([weakref.ref(res.weight), weakref.ref(res.mask)])
        return res

    monkeypatch.setitem(METHODS._items, "wanda", dataclasses.replace(wanda, compress_linear=counting))
    lm = tiny_loaded("llama", hidden=32, layers=2)
    compress(lm, CompressConfig(method="wanda", sparsity=0.5), calib())
    assert len(alive_at_start) == len(list(anatomy(lm.model).iter_linears()))
    assert alive_at_start == [0] * len(alive_at_start)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_row_blocks_give_the_whole_matrix_result(monkeypatch, nm):
    """Wanda's masks and the relative error, computed a block of rows at a time, equal the whole-matrix
    computation (tiny models fit one block, so the blocks are made small here: several per matrix)."""
    from recoup import blocks
    from recoup.compress.masks import nm_mask, unstructured_mask
    from recoup.compress.methods.wanda import wanda_prune
    from recoup.compress.stats import ActNormStats, relative_error

    g = torch.Generator().manual_seed(0)
    w, norms = torch.randn(37, 64, generator=g), torch.rand(64, generator=g) + 0.1
    score = w.abs() * norms[None, :]
    whole = nm_mask(score, *nm) if nm else unstructured_mask(score, 0.5, per_row=True)
    stats = ActNormStats(64)
    stats.sq = norms**2
    res_whole = wanda_prune(w, norms, 0.5, nm)
    err_whole = float(((res_whole.weight - w) ** 2 * stats.sq).sum() / (w * w * stats.sq).sum())
    monkeypatch.setattr(blocks, "ROW_BLOCK_ELEMENTS", 5 * 64)  # 8 blocks, the last one short
    assert len(blocks.row_blocks(*w.shape)) == 8
    res = wanda_prune(w, norms, 0.5, nm)
    assert torch.equal(res.mask, whole) and torch.equal(res.weight, w.masked_fill(whole, 0))
    err, kind = relative_error(w, res.weight, stats)
    assert kind == "act_norm" and err == pytest.approx(err_whole, rel=1e-6)
