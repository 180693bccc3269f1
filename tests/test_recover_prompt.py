"""Hard and soft prompts (Compress-Then-Prompt) on tiny models: training, freezing, save/load, PEFT, transfer."""

from __future__ import annotations

import hashlib
import random

import pytest
import torch
from helpers import save_tiny, tiny_loaded

from recoup.errors import RecoupError
from recoup.model.forward import forward_logits
from recoup.recover.hard_prompt import CTP_CASE_STUDY, HardPrompt
from recoup.recover.losses import lm_loss
from recoup.recover.methods import load_recovery
from recoup.recover.soft_prompt import SoftPrompt, SoftPromptConfig, fit_soft_prompt


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small text with strong regularities a prompt can pick up (random words from a short list)."""
    rng = random.Random(0)
    words = "the cat sat on a mat while dogs ran in the park and birds sang".split()
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(3000)))
    return str(path)


def cfg(corpus: str, **kw) -> SoftPromptConfig:
    base = dict(data=corpus, tokens=4, seqlen=32, batch_size=4, steps=30, lr=0.05, eval_every=10, val_windows=4)
    return SoftPromptConfig(**{**base, **kw})


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def prune_(model: torch.nn.Module, fraction: float = 0.5) -> None:
    """Zero the smallest-magnitude ``fraction`` of every 2-D weight in the decoder layers."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and ".layers." in name:
                k = int(p.numel() * fraction)
                thresh = p.abs().flatten().kthvalue(k).values
                p[p.abs() <= thresh] = 0


def window(loaded, corpus: str, seqlen: int = 32, n: int = 4) -> torch.Tensor:
    ids = loaded.tokenizer(open(corpus).read(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    cut = int(ids.numel() * 0.9)  # the held-out tail, as split_ids does for files
    return ids[cut : cut + n * seqlen].view(n, seqlen)


def test_training_keeps_backbone_bit_identical_masks_intact_and_lowers_loss(corpus):
    lm = tiny_loaded(seed=1)
    prune_(lm.model)
    zeros = {n: (p == 0).clone() for n, p in lm.model.named_parameters()}
    before = digest(lm.model)
    flags = {n: p.requires_grad for n, p in lm.model.named_parameters()}
    prompt, result = fit_soft_prompt(lm, cfg(corpus))
    assert digest(lm.model) == before
    assert all(torch.equal(p == 0, zeros[n]) for n, p in lm.model.named_parameters())
    assert {n: p.requires_grad for n, p in lm.model.named_parameters()} == flags  # restored
    assert result.steps == 30 and result.tokens == 30 * 4 * 32
    base = prompt.meta["train"]["val_loss_without_prompt"]
    assert result.best_val_loss < base - 0.02  # the prompt helps on held-out text
    x = window(lm, corpus)
    with torch.no_grad():
        assert lm_loss(lm.model, x, prompt.prefix(lm.model, x, x)) < lm_loss(lm.model, x, None)


def test_prompt_positions_not_scored_and_shapes(corpus):
    lm = tiny_loaded()
    prompt = SoftPrompt(torch.randn(5, 32))
    x = window(lm, corpus, n=2)
    logits = forward_logits(lm.model, x, None, prompt.prefix(lm.model, x, x))
    assert logits.shape == (2, 32, lm.model.config.vocab_size)
    assert prompt.num_parameters() == 5 * 32


def test_inits(corpus):
    lm = tiny_loaded()
    emb = lm.model.get_input_embeddings().weight
    c = cfg(corpus, steps=1, eval_every=1, val_windows=1)
    p_vocab, _ = fit_soft_prompt(lm, dataclass_replace(c, steps=1))
    text_cfg = cfg(corpus, init="text", init_text="cat", steps=1, lr=1e-6, eval_every=1, val_windows=1)
    ids = lm.tokenizer("cat", add_special_tokens=False).input_ids
    p_text, _ = fit_soft_prompt(lm, text_cfg)
    # lr ~0: the text init survives; 4 tokens = "cat" repeated
    expect = emb[torch.tensor((ids * 2)[:4])].detach()
    assert torch.allclose(p_text.embeddings.detach(), expect, atol=1e-4)
    assert p_vocab.embeddings.shape == (4, 32)
    with pytest.raises(RecoupError, match="init_text"):
        SoftPromptConfig(init="text")
    with pytest.raises(RecoupError, match="did you mean 'tokens'"):
        SoftPromptConfig.from_dict({"token": 3})
    with pytest.raises(RecoupError, match="unknown init"):
        SoftPromptConfig(init="zeros")


def dataclass_replace(c, **kw):
    import dataclasses

    return dataclasses.replace(c, **kw)


def test_save_load_round_trip_and_peft_gives_same_loss(corpus, tmp_path):
    from peft import PeftModel

    lm = tiny_loaded()
    prompt, _ = fit_soft_prompt(lm, cfg(corpus, steps=5))
    prompt.save(tmp_path / "sp")
    assert (tmp_path / "sp" / "adapter_config.json").is_file()
    assert (tmp_path / "sp" / "adapter_model.safetensors").is_file()
    again = load_recovery(tmp_path / "sp")
    assert isinstance(again, SoftPrompt) and torch.equal(again.embeddings, prompt.embeddings)
    x = window(lm, corpus, n=2)
    with torch.no_grad():
        ours = lm_loss(lm.model, x, again.prefix(lm.model, x, x)).item()
        peft_model = PeftModel.from_pretrained(tiny_loaded().model, str(tmp_path / "sp")).eval()
        labels = x.clone()
        labels[:, 0] = -100  # PEFT would score x[0] from the last prompt position; we never score it
        theirs = peft_model(input_ids=x, attention_mask=torch.ones_like(x), labels=labels).loss.item()
        plain = lm_loss(lm.model, x, None).item()
    assert abs(ours - theirs) < 1e-5
    assert abs(ours - plain) > 1e-3  # the prompt is really in the PEFT forward


def test_transfer_across_artifacts_and_hidden_size_mismatch(corpus, tmp_path):
    """A prompt learned on one compressed tiny model attaches unchanged to other sparsity levels."""
    from recoup.artifact import load_model
    from recoup.artifact.fingerprint import compression_fingerprint
    from recoup.artifact.store import save_artifact
    from recoup.compress.config import CompressConfig
    from recoup.compress.engine import compress

    dirs = {}
    for sparsity in (0.4, 0.5, 0.6):
        lm = save_tiny(tmp_path / "dense", seed=3)
        report = compress(lm, CompressConfig(method="magnitude", sparsity=sparsity))
        dirs[sparsity] = save_artifact(lm, report, tmp_path / f"mag{int(sparsity * 100)}")
    source = load_model(str(dirs[0.5]))
    fp = compression_fingerprint(source.model, source.manifest)
    prompt, _ = fit_soft_prompt(source, cfg(corpus, steps=40))
    assert compression_fingerprint(source.model, source.manifest)["digest"] == fp["digest"]
    prompt.save(tmp_path / "sp")
    attached = load_recovery(tmp_path / "sp")
    for sparsity in (0.4, 0.6):
        target = load_model(str(dirs[sparsity]))
        x = window(target, corpus)
        with torch.no_grad():
            assert lm_loss(target.model, x, attached.prefix(target.model, x, x)) < lm_loss(target.model, x, None)
    wide = tiny_loaded(hidden=48)
    x = window(wide, corpus, n=1)
    with pytest.raises(RecoupError, match="hidden size 32 does not match the model's 48"):
        forward_logits(wide.model, x, None, attached.prefix(wide.model, x, x))


def test_hard_prompt_prefix_is_the_texts_embeddings(tmp_path):
    lm = tiny_loaded()
    hp = HardPrompt.from_text(CTP_CASE_STUDY, lm.tokenizer)
    ids = lm.tokenizer(CTP_CASE_STUDY, add_special_tokens=False).input_ids
    pre = hp.prefix(lm.model, torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3))
    assert pre.shape == (len(ids), 32)
    assert torch.equal(pre, lm.model.get_input_embeddings().weight[torch.tensor(ids)])
    x = torch.tensor([ids[:10]])
    # prefix by embedding == the same tokens written in front of the input
    with_prefix = forward_logits(lm.model, x, None, pre)
    as_text = forward_logits(lm.model, torch.tensor([ids + ids[:10]]))[:, len(ids) :]
    assert torch.allclose(with_prefix, as_text, atol=1e-5)
    hp.save(tmp_path / "hp")
    again = load_recovery(tmp_path / "hp")
    assert isinstance(again, HardPrompt) and again.token_ids == ids and again.num_parameters() == 0
    with pytest.raises(RecoupError, match="empty"):
        HardPrompt.from_text("  ", lm.tokenizer)


def test_load_recovery_errors(tmp_path):
    with pytest.raises(RecoupError, match="no recovery directory"):
        load_recovery(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecoupError, match="not a saved recovery"):
        load_recovery(tmp_path / "empty")
    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "adapter_config.json").write_text('{"peft_type": "P_TUNING"}')
    with pytest.raises(RecoupError, match="P_TUNING"):
        load_recovery(tmp_path / "pt")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "recoup_recovery.json").write_text('{"method": "soft-promt"}')
    with pytest.raises(RecoupError, match="did you mean 'soft-prompt'"):
        load_recovery(tmp_path / "odd")


def test_cli_recover_then_eval_with_recovery_and_prompt_text(corpus, tmp_path, capsys):
    from recoup.cli import main

    save_tiny(tmp_path / "m")
    out = tmp_path / "sp"
    args = [
        "recover",
        str(tmp_path / "m"),
        "--method",
        "soft-prompt",
        "--data",
        corpus,
        "--tokens",
        "4",
        "--seqlen",
        "32",
        "--batch-size",
        "2",
        "--steps",
        "6",
        "--eval-every",
        "3",
        "--val-windows",
        "2",
        "--lr",
        "0.05",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert "6 steps" in capsys.readouterr().out
    assert main(args) == 2  # --out not empty
    assert "not empty" in capsys.readouterr().err
    assert main(args[:2] + ["--method", "soft-prompt", "--pool", "3", "--out", str(tmp_path / "x")]) == 2
    assert "'pool' does not apply to method soft-prompt" in capsys.readouterr().err
    base = ["eval", str(tmp_path / "m"), "--tasks", f"ppl:{corpus}", "--seqlen", "32", "--limit", "2"]
    assert main(base + ["--recovery", str(out), "--json", str(tmp_path / "r.json")]) == 0
    import json

    res = json.loads((tmp_path / "r.json").read_text())
    assert res["protocol"]["recovery"]["method"] == "soft-prompt"
    assert main(base + ["--json", str(tmp_path / "plain.json")]) == 0
    plain = json.loads((tmp_path / "plain.json").read_text())
    task = f"ppl:{corpus}"
    # the prompt was trained on this text: attached through the CLI it must lower the perplexity
    assert res["results"][task]["ppl"] < plain["results"][task]["ppl"]
    assert main(base + ["--prompt-text", CTP_CASE_STUDY, "--json", str(tmp_path / "h.json")]) == 0
    res = json.loads((tmp_path / "h.json").read_text())
    assert res["protocol"]["recovery"]["method"] == "hard-prompt"
    assert main(base + ["--prompt-text", "x", "--recovery", str(out)]) == 2
