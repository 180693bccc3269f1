"""IDP prompt pools on tiny models: the two-pass selection equals the full computation, padding, training,
save/load (the one-prefill mode's own properties: tests/test_idp_prefill.py)."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import tiny_loaded

from recoup.errors import RecoupError
from recoup.model.anatomy import anatomy
from recoup.model.forward import build_inputs
from recoup.recover.idp import IDPConfig, IDPPool, fit_idp
from recoup.recover.losses import lm_loss
from recoup.recover.methods import load_recovery


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(1)
    words = "the cat sat on a mat while dogs ran in the park and birds sang".split()
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(3000)))
    return str(path)


def reference_scores(model, pool: torch.Tensor, ids: torch.Tensor, layers: int | None = None) -> torch.Tensor:
    """Selection scores from one uncached eager forward over [pool; input] with output_attentions
    (attention of the first ``layers`` layers, or of all)."""
    m, n, h = pool.shape
    emb = model.get_input_embeddings()
    x = torch.cat([pool.reshape(1, m * n, h).expand(ids.shape[0], -1, -1), emb(ids)], 1)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        att = model(inputs_embeds=x, output_attentions=True, use_cache=False).attentions
    finally:
        model.set_attn_implementation(previous)
    a = torch.stack(att[:layers]).sum((0, 2))[:, m * n :, : m * n]  # (B, T, P): layers and heads summed
    per_pos = a.sum(1)
    per_pos[:, 0] = 0  # the attention sink is left out
    counts = torch.full((m,), float(n))
    counts[0] -= 1
    return per_pos.view(-1, m, n).sum(-1) / counts / ids.shape[1]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3"])
def test_cached_selection_equals_full_forward(arch):
    lm = tiny_loaded(arch)
    torch.manual_seed(0)
    pool = IDPPool(torch.randn(3, 4, 32), select_layers=0, selection="two-pass")
    ids = torch.randint(4, 100, (2, 9))
    hooks = [len(m._forward_hooks) for m in lm.model.modules()]
    with torch.no_grad():
        got = pool.scores(lm.model, ids)
    assert [len(m._forward_hooks) for m in lm.model.modules()] == hooks  # ours removed
    with torch.no_grad():
        want = reference_scores(lm.model, pool.pool.detach(), ids)
    assert got.shape == (2, 3)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    # the pool's key/values are computed once and reused
    cache = pool._kv
    pool.scores(lm.model, ids[:1])
    assert pool._kv is cache
    # nothing left behind: attention implementation and hooks restored
    assert lm.model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_selection_on_the_first_layers_scores_them_and_stops_there(arch, tmp_path):
    lm = tiny_loaded(arch, layers=3)
    torch.manual_seed(0)
    pool = IDPPool(torch.randn(3, 4, 32), select_layers=1, selection="two-pass")
    ids = torch.randint(4, 100, (2, 9))
    with torch.no_grad():
        pool.scores(lm.model, ids)  # the pool's key/values: one full pass, once per model
    layers = anatomy(lm.model).layers
    ran = []
    handles = [layer.register_forward_pre_hook(lambda m, a, k=k: ran.append(k)) for k, layer in enumerate(layers)]
    with torch.no_grad():
        got = pool.scores(lm.model, ids)
        ran_selection = list(ran)
        want = reference_scores(lm.model, pool.pool.detach(), ids, layers=1)
        full = IDPPool(pool.pool.detach(), select_layers=0, selection="two-pass").scores(lm.model, ids)
        # select_layers 5 is more than the model's layers
        every = IDPPool(pool.pool.detach(), select_layers=5, selection="two-pass").scores(lm.model, ids)
    for h in handles:
        h.remove()
    assert ran_selection == [0]  # the pass stopped after the first layer
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4) and not torch.allclose(got, full)
    assert torch.equal(every, full)
    assert lm.model.config._attn_implementation == "sdpa"
    pool.save(tmp_path / "k1")
    again = load_recovery(tmp_path / "k1")
    assert again.select_layers == 1 and again.describe()["select_layers"] == 1
    with torch.no_grad():
        assert torch.equal(again.scores(lm.model, ids), got)


def test_left_padding_does_not_change_an_examples_scores():
    lm = tiny_loaded()
    torch.manual_seed(1)
    pool = IDPPool(torch.randn(4, 3, 32))
    short, long = torch.randint(4, 100, (1, 5)), torch.randint(4, 100, (1, 8))
    batch = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.long)
    batch[0, 3:], mask[0, 3:] = short, 1
    batch[1], mask[1] = long, 1
    together = pool.scores(lm.model, batch, mask)
    assert torch.allclose(together[0], pool.scores(lm.model, short)[0], atol=1e-4)
    assert torch.allclose(together[1], pool.scores(lm.model, long)[0], atol=1e-4)


def test_prefix_is_the_selected_prompt_and_choices_are_reported():
    lm = tiny_loaded()
    torch.manual_seed(2)
    pool = IDPPool(torch.randn(3, 4, 32), selection="two-pass")
    ids = torch.randint(4, 100, (5, 7))
    choice = pool.select(lm.model, ids)
    pre = pool.prefix(lm.model, ids, torch.ones_like(ids))
    assert pre.shape == (5, 4, 32)
    for i, c in enumerate(choice.tolist()):
        assert torch.equal(pre[i], pool.pool[c])
    desc = pool.describe()
    assert desc["choices"] == choice.tolist()
    assert sum(desc["selected"].values()) == 5 and desc["pool"] == 3 and desc["tokens"] == 4
    # one-prefill: the prefix is the whole pool, the choice is made (and reported) by the forward it goes to
    one = IDPPool(pool.pool.detach())
    pre = one.prefix(lm.model, ids, torch.ones_like(ids))
    assert pre.shape == (5, 12, 32) and torch.equal(pre[0], one.pool.reshape(12, 32)) and one.choices == []
    with torch.no_grad():
        lm.model(**build_inputs(lm.model, ids, None, pre))
    assert one.choices == one.select(lm.model, ids).tolist() and one.describe()["selection"] == "one-prefill"


@pytest.mark.parametrize("selection", ["one-prefill", "two-pass"])
def test_fit_idp_keeps_backbone_lowers_loss_and_round_trips(corpus, tmp_path, selection):
    lm = tiny_loaded(seed=4)
    before = [p.detach().clone() for p in lm.model.parameters()]
    cfg = IDPConfig(
        data=corpus,
        pool=3,
        tokens=4,
        seqlen=32,
        batch_size=4,
        steps=30,
        lr=0.05,
        eval_every=10,
        val_windows=4,
        selection=selection,
    )
    pool, result = fit_idp(lm, cfg)
    assert pool.selection == selection and result.best_val_loss < pool.meta["train"]["val_loss_without_prompt"]
    assert all(torch.equal(a, b) for a, b in zip(before, lm.model.parameters(), strict=True))
    assert all(p.requires_grad for p in lm.model.parameters())  # flags restored
    assert sum(pool.meta["training_selections"].values()) == 30 * 4 + 4 * 3  # train picks + validation picks
    ids = lm.tokenizer(open(corpus).read(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    x = ids[-4 * 32 :].view(4, 32)
    with torch.no_grad():
        assert lm_loss(lm.model, x, pool.prefix(lm.model, x, torch.ones_like(x))) < lm_loss(lm.model, x, None)
    pool.save(tmp_path / "idp")
    again = load_recovery(tmp_path / "idp")
    assert isinstance(again, IDPPool) and torch.equal(again.pool, pool.pool)
    assert torch.equal(again.select(lm.model, x), pool.select(lm.model, x))
    wide = tiny_loaded(hidden=48)
    with pytest.raises(RecoupError, match="hidden size 32 does not match the model's 48"):
        again.select(wide.model, x)


def test_config_validation():
    with pytest.raises(RecoupError, match="at least 2"):
        IDPConfig(pool=1)
    with pytest.raises(RecoupError, match="did you mean 'pool'"):
        IDPConfig.from_dict({"pools": 3})
    with pytest.raises(RecoupError, match="prompts >= 2"):
        IDPPool(torch.randn(1, 3, 8))
    with pytest.raises(RecoupError, match="select_layers must be >= 0"):
        IDPConfig(select_layers=-1)
    with pytest.raises(RecoupError, match="unknown IDP selection 'one-pass'; known: one-prefill, two-pass"):
        IDPConfig(selection="one-pass")
    with pytest.raises(RecoupError, match="gradient checkpointing"):
        IDPConfig(gradient_checkpointing=True)
    assert IDPConfig(gradient_checkpointing=True, selection="two-pass").selection == "two-pass"


def test_anatomy_attention_modules_exist_for_every_architecture():
    for arch in ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "opt", "gpt2"]:
        lm = tiny_loaded(arch)
        pool = IDPPool(torch.randn(2, 2, 32))
        scores = pool.scores(lm.model, torch.randint(4, 100, (1, 6)))
        assert scores.shape == (1, 2) and torch.isfinite(scores).all() and (scores > 0).all(), arch
        assert len(anatomy(lm.model).layers) == 2


def test_standardised_selection_and_saved_statistics(tmp_path):
    lm = tiny_loaded()
    torch.manual_seed(5)
    pool = IDPPool(torch.randn(3, 4, 32))
    ids = torch.randint(4, 100, (6, 7))
    raw = pool.scores(lm.model, ids)
    pool.observe_scores(raw, first=True)
    assert torch.allclose(pool.score_mean, raw.mean(0))
    z = (raw - raw.mean(0)) / raw.std(0, unbiased=False)
    assert torch.equal(pool.select(lm.model, ids), z.argmax(-1))
    pool.save(tmp_path / "p")
    again = load_recovery(tmp_path / "p")
    assert torch.equal(again.score_mean, pool.score_mean) and torch.equal(again.score_std, pool.score_std)
    assert torch.equal(again.select(lm.model, ids), z.argmax(-1))
    raw_pool = IDPPool(pool.pool.detach(), standardize=False)
    assert torch.equal(raw_pool.select(lm.model, ids), raw.argmax(-1))
