"""IDP's one-prefill mode on tiny models: what the pooled prefill computes, decoding, padding, layer calls."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_loaded, tiny_tokenizer

from recoup.errors import RecoupError
from recoup.evaluate.scorer import Scorer
from recoup.model.anatomy import anatomy
from recoup.model.forward import build_inputs
from recoup.model.prompt_pool import pool_prefill
from recoup.recover.idp import IDPPool

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "opt", "gpt2"]
M, N, K = 3, 4, 1


def padded_batch(seed: int = 0, rows: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, 9) ids and mask, row 0 left-padded by 3."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 100, (rows, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[0, :3] = 0
    return ids, mask


def capture_entering(layer: torch.nn.Module, store: list):
    return layer.register_forward_pre_hook(
        lambda m, args, kwargs: store.append((args[0] if args else kwargs["hidden_states"]).detach().clone()),
        with_kwargs=True,
    )


def replace_entering(layer: torch.nn.Module, rows: torch.Tensor, start: int):
    """A pre-hook putting ``rows`` (1, T, H) in place of the hidden states from position ``start`` on."""

    def hook(m, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).clone()
        h[:, start:] = rows
        if args:
            return (h, *args[1:]), kwargs
        kwargs["hidden_states"] = h
        return args, kwargs

    return layer.register_forward_pre_hook(hook, with_kwargs=True)


def reference_scores(model, pool: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, layers: int) -> torch.Tensor:
    """The first-``layers`` scores from a plain eager forward with an explicit 4D mask (block-diagonal prompts,
    padding) and explicit positions (each prompt 0..n-1, the input n, n+1, ...): no hooks involved."""
    m, n, h = pool.shape
    p, (b, t) = m * n, ids.shape
    x = torch.cat([pool.reshape(1, p, h).expand(b, -1, -1), model.get_input_embeddings()(ids)], 1)
    block = torch.arange(p) // n
    allowed = torch.ones(p + t, p + t, dtype=torch.bool).tril()
    allowed[:p, :p] &= block[:, None] == block[None, :]
    allowed = allowed[None, None] & torch.cat([torch.ones(b, p, dtype=torch.bool), mask.bool()], 1)[:, None, None]
    allowed |= torch.eye(p + t, dtype=torch.bool)  # a padded row attends to itself (never scored)
    float_mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    pos = torch.cat([torch.arange(n).repeat(m).expand(b, -1), (n + mask.cumsum(-1) - 1).clamp(min=0)], 1)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        att = model(
            inputs_embeds=x, attention_mask=float_mask, position_ids=pos, output_attentions=True, use_cache=False
        ).attentions
    finally:
        model.set_attn_implementation(previous)
    a = torch.stack(att[:layers]).sum((0, 2))[:, p:, :p]  # (B, T, P): layers and heads summed
    per_pos = (a * mask[..., None]).sum(1).view(b, m, n)[..., 1:]  # each prompt's first position left out
    return per_pos.mean(-1) / mask.sum(-1, keepdim=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_prefill_equals_the_chosen_prompt_alone_from_layer_k_on(arch):
    """What is equal, per example b with choice c:

    - the scores equal (to 1e-4) the first-K-layer scores of a plain eager forward with an explicit 4D mask
      and positions (no hooks), and the choice is their (standardised) argmax;
    - prompt c's cached keys/values in every layer equal those of a forward over [prompt c; input]
      (each prompt's key/values are those of the prompt alone);
    - the logits at the input's real positions equal those of a forward over [prompt c; input] whose input
      hidden states entering layer K+1 are replaced by the one-prefill run's (to 1e-4): from layer K+1 on,
      an input token sees exactly prompt c at the same relative positions.
    """
    lm = tiny_loaded(arch, layers=3)
    model, layers = lm.model, anatomy(lm.model).layers
    torch.manual_seed(0)
    pool = IDPPool(torch.randn(M, N, 32), select_layers=K)
    ids, mask = padded_batch()
    want = reference_scores(model, pool.pool.detach(), ids, mask, K)
    with torch.no_grad():
        raw = pool.scores(model, ids, mask)
    assert torch.allclose(raw, want, atol=1e-4, rtol=1e-4)
    pool.observe_scores(raw, first=True)  # standardised on these rows: they do not all choose one prompt
    seen: list = []
    handle = capture_entering(layers[K], seen)
    with torch.no_grad():
        kwargs = build_inputs(model, ids, mask, pool.prefix(model, ids, mask))
        out = model(**kwargs, use_cache=True)
    handle.remove()
    logits = out.logits  # the input's positions only: the pool is the cache in front
    choice = torch.tensor(pool.choices)
    assert torch.equal(choice, pool.choose(want)) and len(set(choice.tolist())) > 1
    p = M * N
    for b in range(len(ids)):
        c = int(choice[b])
        real = mask[b].bool()
        hook = replace_entering(layers[K], seen[0][b : b + 1][:, real], N)
        with torch.no_grad():
            ref = model(**build_inputs(model, ids[b : b + 1, real], None, pool.pool[c].detach()), use_cache=True)
        hook.remove()
        for mine, alone in zip(out.past_key_values.layers, ref.past_key_values.layers):  # prompt c as if alone
            assert torch.allclose(mine.keys[b, :, c * N : (c + 1) * N], alone.keys[0, :, :N], atol=1e-5)
            assert torch.allclose(mine.values[b, :, c * N : (c + 1) * N], alone.values[0, :, :N], atol=1e-5)
        assert torch.allclose(ref.logits[0, N:], logits[b][real], atol=1e-4, rtol=1e-4), arch
    # the forward's 2D mask now shows the chosen prompt only, and the model is as it was
    assert torch.equal(kwargs["attention_mask"][:, :p], (torch.arange(p)[None] // N == choice[:, None]).long())
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "opt"])
def test_decoding_never_attends_to_the_unchosen_prompts(arch):
    """Through the Scorer's prefill and continuation steps: noise written over the unchosen prompts' cached
    keys/values in every layer changes no decode log-prob, noise over the chosen prompt's does."""
    lm = tiny_loaded(arch, layers=3)
    torch.manual_seed(3)
    pool = IDPPool(torch.randn(M, N, 32), select_layers=K)
    scorer = Scorer(lm.model, tiny_tokenizer(), recovery=pool, progress=False)
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    with torch.no_grad():
        _, past, cache = scorer._prefill(rows)
    choice = pool.choices[-2:]
    p = M * N
    assert past[:, :p].sum(-1).tolist() == [N, N]
    step = torch.tensor([[20, 21], [22, 23]])
    ones = torch.ones_like(step)

    def decode(noise_on) -> torch.Tensor:
        c = copy.deepcopy(cache)
        for layer in c.layers:
            for b in range(2):
                for prompt in noise_on(choice[b]):
                    cols = slice(prompt * N, (prompt + 1) * N)
                    layer.keys[b, :, cols] = 100 * torch.randn_like(layer.keys[b, :, cols])
                    layer.values[b, :, cols] = 100 * torch.randn_like(layer.values[b, :, cols])
        return scorer._extend(step, ones, past, c)

    with torch.no_grad():
        clean = decode(lambda c: [])
        unchosen = decode(lambda c: [k for k in range(M) if k != c])
        chosen = decode(lambda c: [c])
    assert torch.allclose(clean, unchosen, atol=1e-5)
    assert not torch.allclose(clean, chosen, atol=1e-2)
    assert len(scorer.generate(["a b c"], max_new_tokens=3)) == 1 and len(pool.choices) == 3


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padded_batch_gives_each_example_its_choice_and_logits_alone(arch):
    lm = tiny_loaded(arch, layers=3)
    torch.manual_seed(4)
    pool = IDPPool(torch.randn(M, N, 32), select_layers=K)
    ids, mask = padded_batch(seed=2)
    with torch.no_grad():
        pool.observe_scores(pool.scores(lm.model, ids, mask), first=True)  # the rows choose different prompts
        together = lm.model(**build_inputs(lm.model, ids, mask, pool.prefix(lm.model, ids, mask))).logits
        both = list(pool.choices)
        for b in range(len(ids)):
            real = mask[b].bool()
            x = ids[b : b + 1, real]
            alone = lm.model(**build_inputs(lm.model, x, None, pool.prefix(lm.model, x, torch.ones_like(x)))).logits
            assert pool.choices[-1] == both[b]
            assert torch.allclose(alone[0], together[b][real], atol=1e-4, rtol=1e-4)
    assert len(set(both)) > 1


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_the_prefill_runs_each_decoder_layer_once(arch):
    """Inference: the pool's key/values are computed once per model and pool state (one pass over the m
    prompts, as a batch of m); then every prefill runs each decoder layer exactly once, over the input only.
    Training (gradients on): the pool pass runs once per forward, then each layer once over the input."""
    lm = tiny_loaded(arch, layers=4)
    an = anatomy(lm.model)
    pool = IDPPool(torch.randn(M, N, 32), select_layers=2)
    ids, mask = padded_batch()
    sizes: list[tuple[int, int]] = []  # (layer, tokens per row) of every decoder-layer call

    def record(m, args, kwargs, i):
        sizes.append((i, (args[0] if args else kwargs["hidden_states"]).shape[1]))

    handles = [
        layer.register_forward_pre_hook(lambda m, a, k, i=i: record(m, a, k, i), with_kwargs=True)
        for i, layer in enumerate(an.layers)
    ]

    def run(rec):
        return lm.model(**build_inputs(lm.model, ids, mask, rec.prefix(lm.model, ids, mask)), use_cache=True)

    with torch.no_grad():
        run(pool)
        first, cached = list(sizes), pool_prefill(lm.model)._kv
        sizes.clear()
        run(pool)
        again = list(sizes)
        assert pool_prefill(lm.model)._kv is cached
    sizes.clear()
    run(pool).logits.sum().backward()  # training: the pool pass is redone with gradients
    trained = list(sizes)
    assert pool.pool.grad is not None and pool.pool.grad.abs().sum() > 0
    two_pass = IDPPool(pool.pool.detach(), select_layers=2, selection="two-pass")
    with torch.no_grad():
        two_pass.scores(lm.model, ids, mask)  # its pool key/values: once per model
        sizes.clear()
        run(two_pass)
    for h in handles:
        h.remove()
    assert first == [(i, N) for i in range(4)] + [(i, 9) for i in range(4)]
    assert again == [(i, 9) for i in range(4)]
    assert trained == first
    assert sorted(i for i, _ in sizes) == [0, 0, 1, 1, 2, 3]  # the two-pass mode reruns the scored layers


def test_all_layers_scored_choose_after_the_prefill_and_mask_only_what_follows():
    lm = tiny_loaded(layers=2)
    torch.manual_seed(6)
    pool = IDPPool(torch.randn(M, N, 32), select_layers=0)
    ids, mask = padded_batch()
    with torch.no_grad():
        kwargs = build_inputs(lm.model, ids, mask, pool.prefix(lm.model, ids, mask))
        lm.model(**kwargs)
        want = reference_scores(lm.model, pool.pool.detach(), ids, mask, 2)
    assert pool.choices == pool.choose(want).tolist()
    choice = torch.tensor(pool.choices)
    assert torch.equal(kwargs["attention_mask"][:, : M * N], (torch.arange(M * N)[None] // N == choice[:, None]).long())


def test_a_prefix_not_followed_by_its_prefill_is_refused_and_modes_round_trip(tmp_path):
    lm = tiny_loaded()
    pool = IDPPool(torch.randn(M, N, 32), select_layers=1)
    ids, mask = padded_batch()
    pool.prefix(lm.model, ids, mask)
    with pytest.raises(RecoupError, match="next forward"):
        lm.model(input_ids=ids[:, :4])
    lm.model(input_ids=ids[:, :4])  # disarmed: the model runs as before
    lm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.model.train()
    with pytest.raises(RecoupError, match="gradient checkpointing"):
        lm.model(**build_inputs(lm.model, ids, mask, pool.prefix(lm.model, ids, mask)))
    lm.model.gradient_checkpointing_disable()
    lm.model.eval()
    pool.save(tmp_path / "p")
    import json

    from recoup.recover.methods import load_recovery

    record = json.loads((tmp_path / "p" / "recoup_recovery.json").read_text())
    assert record["selection"] == "one-prefill" and record["select_layers"] == 1
    assert load_recovery(tmp_path / "p").selection == "one-prefill"
    del record["selection"]  # a pool saved before the modes: two-pass, as it was trained
    (tmp_path / "p" / "recoup_recovery.json").write_text(json.dumps(record))
    old = load_recovery(tmp_path / "p")
    assert old.selection == "two-pass" and old.prefix(lm.model, ids, mask).shape == (4, N, 32)
