"""dtype auto, device_map auto, gradient checkpointing and mixed-precision training on tiny models (CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import save_tiny
from safetensors.torch import load_file
from test_run import write_corpus

from recoup.artifact import load_model
from recoup.errors import RecoupError
from recoup.model.load import resolve_dtype
from recoup.recipe.jobs import EvalJob, RecoverJob
from recoup.runs import stages


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dtypes")
    save_tiny(tmp / "model", "llama", hidden=32, layers=2)
    return tmp / "model", write_corpus(tmp / "corpus.txt")


def test_auto_is_the_checkpoint_dtype_on_cuda_and_float32_on_cpu(tiny, tmp_path):
    model, _ = tiny
    bf16 = tmp_path / "bf16"
    bf16.mkdir()
    cfg = json.loads((model / "config.json").read_text())
    (bf16 / "config.json").write_text(json.dumps({**cfg, "dtype": "bfloat16"}))
    assert resolve_dtype("auto", "cpu", bf16) == torch.float32
    assert resolve_dtype("auto", "cuda", bf16) == torch.bfloat16
    assert resolve_dtype("auto", "cuda:1", model) == torch.float32  # the tiny checkpoint is float32
    assert resolve_dtype("bf16", "cpu", model) == torch.bfloat16
    assert EvalJob(model=str(model)).dtype == "auto"
    assert load_model(str(model), dtype="auto", device="cpu").model.dtype == torch.float32
    with pytest.raises(RecoupError, match="unknown dtype 'half'; use auto"):
        EvalJob(model=str(model), dtype="half")
    with pytest.raises(RecoupError, match="unknown device_map 'balanced'"):
        EvalJob(model=str(model), device_map="balanced")


def test_device_map_auto_evaluates_like_one_device(tiny, tmp_path):
    model, corpus = tiny
    keys = {"model": str(model), "tasks": [f"ppl:{corpus}"], "limit": 2, "seqlen": 32}
    plain = stages.evaluate(EvalJob.from_flat(keys))["results"][f"ppl:{corpus}"]
    mapped = stages.evaluate(EvalJob.from_flat({**keys, "device_map": "auto"}))["results"][f"ppl:{corpus}"]
    assert plain["ppl"] == pytest.approx(mapped["ppl"], rel=1e-6)
    # an artifact too: compressed, then loaded with big-model placement
    art = tmp_path / "art"
    stages.compress(
        stages.CompressJob.from_flat({"model": str(model), "out": str(art), "method": "magnitude", "sparsity": 0.5})
    )
    a = stages.evaluate(EvalJob.from_flat({**keys, "model": str(art)}))["results"][f"ppl:{corpus}"]["ppl"]
    b = stages.evaluate(EvalJob.from_flat({**keys, "model": str(art), "device_map": "auto"}))
    assert a == pytest.approx(b["results"][f"ppl:{corpus}"]["ppl"], rel=1e-6)


def heldout_loss(model_dir, recovery, text, dtype: str = "float32", seqlen: int = 16, windows: int = 16) -> float:
    """Mean next-token loss of the model in ``model_dir`` with ``recovery`` attached (None: the model alone) on
    the first ``windows`` windows of ``text``, a file the recovery never trained or validated on."""
    from recoup.data.bos import bos_id
    from recoup.data.windows import consecutive_windows, corpus_ids
    from recoup.evaluate.runner import attach
    from recoup.recover.losses import lm_loss

    loaded = attach(load_model(str(model_dir), dtype=dtype), recovery)
    bos = bos_id(loaded.tokenizer, "auto")
    x = consecutive_windows(corpus_ids(loaded.tokenizer, str(text), "test"), seqlen, windows, bos)
    with torch.no_grad():
        prefix = recovery.prefix(loaded.model, x, torch.ones_like(x)) if recovery is not None else None
        return float(lm_loss(loaded.model, x, prefix))


def starting_point(model_dir, method: str, corpus, seed: int, seqlen: int = 16, tokens: int = 4):
    """What training starts from: a soft prompt's initial rows (rebuilt exactly as ``fit_soft_prompt`` draws
    them); for a LoRA nothing, since PEFT's init (B = 0) computes what the model alone computes."""
    if method == "lora":
        return None
    from recoup.recover.prompt import init_embeddings
    from recoup.recover.soft_prompt import SoftPrompt, SoftPromptConfig
    from recoup.recover.task_data import training_data

    loaded = load_model(str(model_dir))
    cfg = SoftPromptConfig(data=str(corpus), seqlen=seqlen, tokens=tokens, seed=seed)
    data = training_data(loaded.tokenizer, cfg)
    return SoftPrompt(init_embeddings(loaded.model, loaded.tokenizer, cfg, data.token_ids(), tokens))


def _recover(model, corpus, out, method="soft-prompt", **extra):
    keys = {
        "model": str(model),
        "method": method,
        "out": str(out),
        "data": str(corpus),
        "seqlen": 16,
        "batch_size": 2,
        "steps": 3,
        "eval_every": 3,
        "val_windows": 2,
        "lr": 0.05,
        **extra,
    }
    if method == "soft-prompt":
        keys.setdefault("tokens", 4)
    return stages.recover(RecoverJob.from_flat(keys))


@pytest.mark.parametrize("method", ["soft-prompt", "lora"])
def test_gradient_checkpointing_recomputes_layers_and_learns_the_same(tiny, tmp_path, monkeypatch, method):
    model, corpus = tiny
    calls = {"n": 0}
    from transformers.models.llama import modeling_llama

    forward = modeling_llama.LlamaMLP.forward

    def counted(self, *a, **k):
        calls["n"] += 1
        return forward(self, *a, **k)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", counted)
    _recover(model, corpus, tmp_path / "plain", method)
    plain_calls, calls["n"] = calls["n"], 0
    _recover(model, corpus, tmp_path / "ckpt", method, gradient_checkpointing=True)
    assert calls["n"] > plain_calls  # the backward re-ran the layers' forwards
    a = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ckpt" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.parametrize("method", ["soft-prompt", "lora"])
def test_bf16_model_trains_float32_recovery_under_autocast(tiny, tmp_path, method):
    model, corpus = tiny
    s = _recover(
        model,
        corpus,
        tmp_path / "bf16",
        method,
        dtype="bfloat16",
        steps=12,
        eval_every=4,
        gradient_checkpointing=True,
        lr=0.05 if method == "soft-prompt" else 0.01,
    )
    weights = load_file(str(tmp_path / "bf16" / "adapter_model.safetensors"))
    assert weights and all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())
    losses = s["train"]["train_loss"]
    assert all(torch.isfinite(torch.tensor(losses)))
    from recoup.recover.methods import load_recovery

    heldout = write_corpus(tmp_path / "heldout.txt", 1500, seed=7)  # the same language, text never seen
    start = heldout_loss(model, starting_point(model, method, corpus, seed=0), heldout, "bfloat16")
    trained = heldout_loss(model, load_recovery(tmp_path / "bf16"), heldout, "bfloat16")
    assert trained < start - 0.05, (start, trained)  # training in bf16 under autocast lowered held-out loss
