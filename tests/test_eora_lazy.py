"""EoRA read one decoder layer at a time (the artifact and its dense source both lazy) gives the recovery the
whole-model path gives, bit for bit, with one layer of each model in memory at a time."""

from __future__ import annotations

import pytest
import torch
from helpers import needs_packs, save_tiny

from recoup.artifact.lazy import load_artifact_lazy
from recoup.model.recovery import Recovery
from recoup.recover.eora import EoraConfig, fit_lazy
from recoup.runs import stages

RECIPES = {
    "sparsegpt-w4": dict(method="sparsegpt", sparsity=0.5, bits=4, group_size=16),
    "rtn-dense": dict(method="rtn", bits=4, group_size=16, storage="dense"),
    "wanda": dict(method="wanda", sparsity=0.5),
}


def _artifact(tmp_path, arch: str, recipe: str):
    save_tiny(tmp_path / "dense", arch, hidden=32, layers=3)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"the {w} of word {i}." for i, w in enumerate(["cat", "dog", "sea", "sky"] * 200)))
    keys = {"model": str(tmp_path / "dense"), "out": str(tmp_path / "art"), "calib": str(text), "nsamples": 4}
    stages.compress(stages.CompressJob.from_flat({**keys, "seqlen": 32, "device": "cpu", **RECIPES[recipe]}))
    return tmp_path / "art", text


def _recover(art, text, out, lazy: bool) -> Recovery:
    from recoup.recover.methods import load_recovery

    flat = {"model": str(art), "method": "eora", "out": str(out), "lazy": lazy, "rank": 4, "calib": str(text)}
    stages.recover(stages.RecoverJob.from_flat({**flat, "nsamples": 4, "seqlen": 32}))
    return load_recovery(out)


@pytest.mark.parametrize("arch,recipe", [("llama", "sparsegpt-w4"), ("llama", "rtn-dense"), ("gpt2", "wanda")])
def test_lazy_eora_is_the_whole_model_eora(tmp_path, arch, recipe):
    art, text = _artifact(tmp_path, arch, recipe)
    whole = _recover(art, text, tmp_path / "whole", False)
    lazy = _recover(art, text, tmp_path / "lazy", True)
    assert whole.state.keys() == lazy.state.keys() and whole.state
    assert all(torch.equal(whole.state[k], lazy.state[k]) for k in whole.state)
    drop = ("seconds",)
    assert {k: v for k, v in whole.meta.items() if k not in drop} == {
        k: v for k, v in lazy.meta.items() if k not in drop
    }
    assert lazy.meta["compression_fingerprint"]["unchanged"]


def test_lazy_eora_holds_one_layer_of_each_model(tmp_path, monkeypatch):
    """At each layer's work the artifact's and the dense source's weights in memory are that layer's alone
    (besides the embeddings the capture read), and every stored tensor of a layer is read once."""
    from recoup.model import lazy as lazy_mod
    from recoup.recover import eora

    art, text = _artifact(tmp_path, "llama", "sparsegpt-w4")
    loaded, weights = load_artifact_lazy(art)
    teachers = []
    load_lazy = lazy_mod.load_lazy

    def spy(source, dtype="float32"):
        teachers.append(load_lazy(source, dtype))
        return teachers[-1]

    monkeypatch.setattr(lazy_mod, "load_lazy", spy)
    alive: list[tuple[list[str], list[str]]] = []
    work = eora._compensate_layer

    def layer_work(i, *args):
        alive.append((sorted(weights.alive()), sorted(teachers[0][1].alive())))
        return work(i, *args)

    monkeypatch.setattr(eora, "_compensate_layer", layer_work)
    rec, _ = fit_lazy(loaded, weights, EoraConfig(rank=4, calib=str(text), nsamples=4, seqlen=32))
    assert len(alive) == 3 and rec.state
    for i, (student, teacher) in enumerate(alive):
        layer = f"model.layers.{i}."
        assert [n for n in student if n.startswith("model.layers.")] == sorted(
            n for n in weights.files if n.startswith(layer)
        )
        assert all(n.startswith(layer) for n in teacher) and teacher
    assert weights.alive() == [] and teachers[0][1].alive() == []
    assert all(n == 1 for n in weights.reads.values())


@pytest.mark.slow
@needs_packs  # PTB calibration
def test_lazy_eora_is_the_whole_model_eora_on_the_bundled_model(tmp_path):
    from recoup.model.load import bundled_model_dir

    if not (bundled_model_dir() / "config.json").is_file():
        pytest.skip("the bundled model is not set up (recoup setup)")
    flat = {"model": "smollm2-135m", "out": str(tmp_path / "art"), "method": "rtn", "bits": 3, "group_size": 64}
    stages.compress(stages.CompressJob.from_flat({**flat, "device": "cpu"}))
    recs = []
    for lazy in (False, True):
        keys = {"model": str(tmp_path / "art"), "method": "eora", "out": str(tmp_path / f"eora-{lazy}"), "lazy": lazy}
        stages.recover(stages.RecoverJob.from_flat({**keys, "rank": 8, "calib": "ptb", "nsamples": 2, "seqlen": 64}))
        from recoup.recover.methods import load_recovery

        recs.append(load_recovery(tmp_path / f"eora-{lazy}"))
    whole, lazy = recs
    assert whole.state.keys() == lazy.state.keys()
    assert all(torch.equal(whole.state[k], lazy.state[k]) for k in whole.state)
    assert whole.meta["compression_fingerprint"] == lazy.meta["compression_fingerprint"]
