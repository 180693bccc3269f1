"""Soft prompts and IDP pools trained on a multiple-choice task's train part (the LoRA/CPET split)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import needs_packs, save_tiny, tiny_loaded
from test_recover_prompt import digest, prune_

import recoup.recover.task_data as task_data
from recoup.errors import RecoupError
from recoup.model.forward import forward_logits
from recoup.recover.idp import IDPConfig, IDPPool, fit_idp
from recoup.recover.losses import mean_loss, prefixed_loss
from recoup.recover.methods import load_recovery
from recoup.recover.soft_prompt import SoftPrompt, SoftPromptConfig, fit_soft_prompt
from recoup.recover.task_data import collate, context_part, split_task, task_sequences, tuning_data

SEQLEN = 48


pytestmark = needs_packs


def peaked(lm):
    """A tiny random model whose predictions depend on its input: a default-init one is near uniform
    (loss ~ log vocab) whatever it is fed, which leaves a prompt almost nothing to move."""
    with torch.no_grad():
        lm.model.lm_head.weight.mul_(20)
    return lm


@pytest.fixture()
def seen_batches(monkeypatch):
    """Every batch the training loops draw from ``batch_stream``."""
    seen: list = []
    original = task_data.batch_stream

    def recording(*args, **kwargs):
        for b in original(*args, **kwargs):
            seen.append(b)
            yield b

    monkeypatch.setattr(task_data, "batch_stream", recording)
    return seen


def rows_of(batches) -> set[tuple[int, ...]]:
    return {
        tuple(b.input_ids[i][b.attention_mask[i].bool()].tolist()) for b in batches for i in range(len(b.input_ids))
    }


def test_config_task_and_data_are_exclusive_and_corpus_defaults_unchanged():
    with pytest.raises(RecoupError, match="not both"):
        SoftPromptConfig(task="sciq", data="ptb")
    with pytest.raises(RecoupError, match="not both"):
        IDPConfig(task="sciq", data="wiki")
    with pytest.raises(RecoupError, match="val_windows applies to corpus"):
        SoftPromptConfig(task="sciq", val_windows=2)
    with pytest.raises(RecoupError, match="heldout_fraction"):
        IDPConfig(task="sciq", heldout_fraction=1.5)
    with pytest.raises(RecoupError, match="only with a task"):
        SoftPromptConfig(heldout_fraction=0.2)
    corpus = SoftPromptConfig()
    assert (corpus.data, corpus.task, corpus.val_windows, corpus.heldout_fraction) == ("ptb", None, 4, None)
    task = SoftPromptConfig(task="sciq")
    assert (task.data, task.heldout_fraction, task.val_windows) == (None, 0.3, None)


def test_prefixed_loss_scores_only_the_continuation_whatever_the_padding():
    lm = tiny_loaded()
    train = sorted(tuning_data(lm.tokenizer, task="sciq", max_len=200).train, key=lambda s: len(s.ids))
    seqs = [train[0], train[len(train) // 2], train[-1]]
    prefix = torch.randn(4, 32)
    batch = collate(seqs, pad_id=0)
    assert batch.attention_mask.sum(1).unique().numel() > 1  # really padded
    with torch.no_grad():
        together = prefixed_loss(lm.model, batch, "cpu", prefix, reduction="sum")
        alone = sum(prefixed_loss(lm.model, collate([s], 0), "cpu", prefix, reduction="sum") for s in seqs)
        # by hand: full logits at the input positions, cross-entropy on the gold continuation tokens only
        logits = forward_logits(lm.model, batch.input_ids, batch.attention_mask, prefix)[:, :-1]
        want = sum(
            F.cross_entropy(
                logits[i, s.first_scored - 1 : len(s.ids) - 1], torch.tensor(s.ids[s.first_scored :]), reduction="sum"
            )
            for i, s in enumerate(seqs)
        )
    assert torch.allclose(together, alone, rtol=1e-4) and torch.allclose(together, want, rtol=1e-4)
    n = sum(len(s.ids) - s.first_scored for s in seqs)
    assert mean_loss(lm.model, seqs, 0, 2, lambda b: prefix) == pytest.approx(float(want) / n, rel=1e-4)


def test_soft_prompt_on_task_lowers_validation_loss_keeps_backbone_and_never_sees_heldout(seen_batches, tmp_path):
    lm = peaked(tiny_loaded(seed=1))
    prune_(lm.model)
    before = digest(lm.model)
    flags = {n: p.requires_grad for n, p in lm.model.named_parameters()}
    cfg = SoftPromptConfig(task="sciq", tokens=4, seqlen=SEQLEN, batch_size=4, steps=16, lr=0.05, eval_every=16)
    prompt, result = fit_soft_prompt(lm, cfg)
    assert digest(lm.model) == before
    assert {n: p.requires_grad for n, p in lm.model.named_parameters()} == flags
    assert result.best_val_loss < prompt.meta["train"]["val_loss_without_prompt"] - 0.1
    assert len(seen_batches) == 16 and result.tokens == sum(b.tokens for b in seen_batches)
    split = split_task("sciq", 0.3, 0)
    heldout = {tuple(s.ids) for s in task_sequences(lm.tokenizer, split.heldout, SEQLEN)}
    train_part = {tuple(s.ids) for s in task_sequences(lm.tokenizer, split.train, SEQLEN)}
    trained = rows_of(seen_batches)
    assert trained and trained <= train_part and not trained & heldout
    proto = prompt.meta["data"]
    assert (proto["task"], proto["heldout_fraction"], proto["seed"]) == ("sciq", 0.3, 0)
    assert (proto["n_train"], proto["n_heldout"]) == (len(split.train), len(split.heldout))
    prompt.save(tmp_path / "sp")
    again = load_recovery(tmp_path / "sp")
    assert isinstance(again, SoftPrompt) and again.meta["data"] == proto
    assert torch.equal(again.embeddings, prompt.embeddings)


def test_idp_on_task_reports_choices_and_selects_the_same_prompt_padded_or_alone(seen_batches, tmp_path):
    lm = peaked(tiny_loaded(seed=4))
    before = [p.detach().clone() for p in lm.model.parameters()]
    cfg = IDPConfig(task="sciq", pool=3, tokens=4, seqlen=SEQLEN, batch_size=4, steps=8, lr=0.05, eval_every=8)
    pool, result = fit_idp(lm, cfg)
    assert all(torch.equal(a, b) for a, b in zip(before, lm.model.parameters(), strict=True))
    tuning = tuning_data(lm.tokenizer, task="sciq", max_len=SEQLEN)
    # every training example and the validation over the valid slice made one choice each
    assert sum(pool.meta["training_selections"].values()) == 8 * 4 + len(tuning.valid)
    assert pool.meta["data"]["task"] == "sciq" and pool.meta["data"]["n_heldout"] == len(tuning.split.heldout)
    assert result.best_val_loss < pool.meta["train"]["val_loss_without_prompt"] - 0.1
    assert sum(v > 0 for v in pool.meta["training_selections"].values()) >= 2  # the selection really chooses
    heldout = {tuple(s.ids) for s in task_sequences(lm.tokenizer, tuning.split.heldout, SEQLEN)}
    assert not rows_of(seen_batches) & heldout
    # the selection sees each row's context only, and padding does not change it
    seqs = sorted(tuning.valid, key=lambda s: s.first_scored)[::12][:5]
    batch = collate(seqs, pad_id=0)
    ids, mask = context_part(batch)
    assert [ids[i][mask[i].bool()].tolist() for i in range(len(seqs))] == [s.ids[: s.first_scored] for s in seqs]
    assert mask.sum(1).unique().numel() > 1  # contexts of different lengths, right-padded
    with torch.no_grad():
        together = pool.scores(lm.model, ids, mask)
        alone = torch.cat([pool.scores(lm.model, torch.tensor([s.ids[: s.first_scored]])) for s in seqs])
    assert torch.allclose(together, alone, atol=1e-5, rtol=1e-4)
    assert torch.equal(pool.choose(together), pool.choose(alone))
    pool.save(tmp_path / "idp")
    again = load_recovery(tmp_path / "idp")
    assert isinstance(again, IDPPool) and again.meta["data"] == pool.meta["data"]
    assert torch.equal(again.choose(together), pool.choose(together))


def test_cli_recover_on_task_then_eval_and_compare_recovery(tmp_path, capsys):
    from recoup.cli import main

    save_tiny(tmp_path / "m")
    m = str(tmp_path / "m")
    common = [
        "--task",
        "sciq",
        "--tokens",
        "4",
        "--seqlen",
        str(SEQLEN),
        "--batch-size",
        "4",
        "--steps",
        "2",
        "--eval-every",
        "2",
    ]
    assert main(["recover", m, "--method", "soft-prompt", "--out", str(tmp_path / "sp")] + common) == 0
    assert (
        main(
            ["recover", m, "--method", "idp", "--pool", "2", "--select-layers", "1", "--out", str(tmp_path / "idp")]
            + common
        )
        == 0
    )
    capsys.readouterr()
    assert json.loads((tmp_path / "idp" / "recoup_recovery.json").read_text())["select_layers"] == 1
    saved = json.loads((tmp_path / "sp" / "recoup_run.json").read_text())["config"]
    assert (saved["task"], saved["data"], saved["heldout_fraction"]) == ("sciq", None, 0.3)
    assert json.loads((tmp_path / "idp" / "recoup_recovery.json").read_text())["data"]["task"] == "sciq"
    # --task and --data together: one clear line, exit 2
    assert main(["recover", m, "--method", "soft-prompt", "--out", str(tmp_path / "x"), "--data", "ptb"] + common) == 2
    err = capsys.readouterr().err.strip()
    assert "not both" in err and len(err.splitlines()) == 1
    assert (
        main(
            [
                "eval",
                m,
                "--tasks",
                "sciq",
                "--limit",
                "2",
                "--recovery",
                str(tmp_path / "sp"),
                "--json",
                str(tmp_path / "e.json"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "e.json").read_text())["protocol"]["recovery"]["method"] == "soft-prompt"
    compare = [
        "compare-recovery",
        "--task",
        "sciq",
        "--compressed",
        m,
        "--recovery",
        str(tmp_path / "sp"),
        "--recovery",
        str(tmp_path / "idp"),
        "--limit",
        "2",
        "--prompt-len",
        "8",
        "--new-tokens",
        "2",
        "--repeats",
        "1",
    ]
    assert main(compare + ["--json", str(tmp_path / "c.json")]) == 0
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["compressed", "+soft-prompt", "+idp"]
    assert [r["tuned_on"] for r in rows] == [None, "sciq", "sciq"] and rows[2]["idp_selected"] is not None
    capsys.readouterr()
    # scoring another split of the task the prompts were tuned on could score their training examples
    assert main(compare + ["--seed", "1"]) == 2
    assert "tuned on another split of sciq" in capsys.readouterr().err
