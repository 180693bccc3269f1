"""The Scorer on tiny random models: batched == one-at-a-time, shared contexts run once, prefixes, decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_loaded

from recoup.evaluate.scorer import Scorer
from recoup.model.forward import forward_logits
from recoup.model.recovery import Recovery

REQUESTS = [
    ("Question: what is 2+2?\nAnswer:", " four"),
    ("Question: what is 2+2?\nAnswer:", " 4"),
    ("Question: what is 2+2?\nAnswer:", " twenty-two"),
    ("Hi", " there friend"),
    ("Hi ", "there"),
    ("A much longer context here, with more words in it", " x"),
    ("", "hello"),
    ("Q", " abcdefghij"),
]


class PrefixRecovery(Recovery):
    """A fixed random embedding prefix, shared (P, H) or per example (B, P, H) from the first input id."""

    method = "test-prefix"

    def __init__(self, hidden: int, length: int = 3, per_example: bool = False) -> None:
        torch.manual_seed(1)
        self.table = torch.randn(7, length, hidden)
        self.per_example = per_example
        self.applied = 0

    def apply(self, model):
        self.applied += 1
        return model

    def prefix(self, model, input_ids, attention_mask):
        if not self.per_example:
            return self.table[0]
        first = torch.stack([row[mask.bool()][0] for row, mask in zip(input_ids, attention_mask)])
        return self.table[first % 7]

    def num_parameters(self) -> int:
        return self.table.numel()

    def save(self, path) -> None:  # pragma: no cover - not used
        raise NotImplementedError


def reference_ll(model, scorer: Scorer, context: str, continuation: str, recovery=None) -> float:
    """Sum log p(continuation | context) from one plain full forward of one example."""
    ctx, cont = scorer.encode_pair(context, continuation)
    ids = torch.tensor([list(ctx) + list(cont)])
    prefix = recovery.prefix(model, ids, torch.ones_like(ids)) if recovery is not None else None
    with torch.no_grad():
        logp = F.log_softmax(forward_logits(model, ids, torch.ones_like(ids), prefix).float(), -1)[0]
    n = len(cont)
    return float(logp[-n - 1 : -1].gather(1, ids[0, -n:, None]).sum())


def reference_greedy(model, scorer: Scorer, prompt: str, steps: int, recovery=None) -> str:
    ids = torch.tensor([scorer.encode(prompt)])
    new = []
    for _ in range(steps):
        prefix = recovery.prefix(model, ids, torch.ones_like(ids)) if recovery is not None else None
        with torch.no_grad():
            tok = int(forward_logits(model, ids, torch.ones_like(ids), prefix)[0, -1].argmax())
        if tok in scorer.eos_ids:
            break
        new.append(tok)
        ids = torch.cat([ids, torch.tensor([[tok]])], 1)
    return scorer.tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "gemma3_text"])
def test_batched_loglikelihood_equals_one_at_a_time(arch):
    lm = tiny_loaded(arch)
    scorer = Scorer(lm.model, lm.tokenizer, batch_size=5, progress=False)
    got = scorer.loglikelihood(REQUESTS)
    for (ctx, cont), (ll, _) in zip(REQUESTS, got, strict=True):
        assert ll == pytest.approx(reference_ll(lm.model, scorer, ctx, cont), abs=1e-4)
    one = Scorer(lm.model, lm.tokenizer, batch_size=1, progress=False).loglikelihood(REQUESTS)
    assert [a for a, _ in one] == pytest.approx([a for a, _ in got], abs=1e-4)


def test_is_greedy_flag_matches_argmax():
    lm = tiny_loaded("llama")
    scorer = Scorer(lm.model, lm.tokenizer, progress=False)
    greedy = reference_greedy(lm.model, scorer, "Hello", 3)
    (_, flag_yes), (_, flag_no) = scorer.loglikelihood(
        [("Hello", greedy), ("Hello", greedy[:-1] + chr(ord(greedy[-1]) ^ 1))]
    )
    assert flag_yes is True and flag_no is False


def test_each_shared_context_runs_once():
    lm = tiny_loaded("llama")
    rows_seen: list[int] = []
    handle = lm.model.register_forward_pre_hook(
        lambda mod, args, kwargs: rows_seen.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        scorer = Scorer(lm.model, lm.tokenizer, batch_size=64, progress=False)
        scorer.loglikelihood([("The same long shared context, " * 4, f" choice {i}") for i in range(4)])
    finally:
        handle.remove()
    ctx_len = len(scorer.encode_pair("The same long shared context, " * 4, " choice 0")[0])
    # one prefill over the context (one row) and one step over the continuations: the context is not repeated
    assert len(rows_seen) == 2 and rows_seen[0] == ctx_len and rows_seen[1] < ctx_len


def test_encode_pair_moves_trailing_space_to_continuation():
    lm = tiny_loaded("llama")
    scorer = Scorer(lm.model, lm.tokenizer, progress=False)
    assert scorer.encode_pair("Answer: ", "yes") == scorer.encode_pair("Answer:", " yes")
    ctx, cont = scorer.encode_pair("", "abc")
    assert ctx == (scorer.prefix_token,) and len(cont) == 3


@pytest.mark.parametrize("per_example", [False, True])
@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_prefix_recovery_in_loglikelihood_and_generation(arch, per_example):
    lm = tiny_loaded(arch)
    rec = PrefixRecovery(
        lm.model.config.hidden_size if arch != "gpt2" else lm.model.config.n_embd, per_example=per_example
    )
    scorer = Scorer(lm.model, lm.tokenizer, recovery=rec, batch_size=4, progress=False)
    assert rec.applied == 1
    got = scorer.loglikelihood(REQUESTS[:6])
    for (ctx, cont), (ll, _) in zip(REQUESTS[:6], got, strict=True):
        assert ll == pytest.approx(reference_ll(lm.model, scorer, ctx, cont, rec), abs=1e-4)
    plain = Scorer(lm.model, lm.tokenizer, batch_size=4, progress=False).loglikelihood(REQUESTS[:6])
    assert any(abs(a[0] - b[0]) > 1e-3 for a, b in zip(got, plain, strict=True))  # the prefix really reached the model
    prompts = ["Hello wor", "Q: a?\nA:", "xyz"]
    outs = scorer.generate(prompts, max_new_tokens=6)
    assert outs == [reference_greedy(lm.model, scorer, p, 6, rec) for p in prompts]
    assert rec.applied == 1


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "qwen3"])
def test_batched_generation_equals_uncached_greedy(arch):
    lm = tiny_loaded(arch)
    scorer = Scorer(lm.model, lm.tokenizer, batch_size=2, progress=False)
    prompts = ["Hello wor", "Q: what?\nA:", "x", "a longer prompt than the others"]
    outs = scorer.generate(prompts, max_new_tokens=8)
    assert outs == [reference_greedy(lm.model, scorer, p, 8) for p in prompts]


def test_generation_cuts_at_stop_string_after_leading_whitespace():
    lm = tiny_loaded("llama")
    scorer = Scorer(lm.model, lm.tokenizer, progress=False)
    full = scorer.generate(["Hello wor"], max_new_tokens=10)[0]
    assert len(full) >= 4
    stop = full[2:4]
    cut = scorer.generate(["Hello wor"], max_new_tokens=10, stop=[stop])[0]
    lead = len(full) - len(full.lstrip())
    assert cut == full[: full.find(stop, lead)]
    assert stop not in cut[lead:]


def test_rolling_loglikelihood_scores_every_token_once():
    lm = tiny_loaded("llama")
    scorer = Scorer(lm.model, lm.tokenizer, progress=False)
    text = "the quick brown fox jumps over the lazy dog, again and again"
    tokens = scorer.encode(text)
    whole, n = scorer.rolling_loglikelihood([text], window=len(tokens) + 5)[0]
    assert n == len(tokens)
    ids = torch.tensor([[scorer.prefix_token] + tokens])
    with torch.no_grad():
        logp = F.log_softmax(lm.model(input_ids=ids).logits.float(), -1)[0]
    assert whole == pytest.approx(float(logp[:-1].gather(1, ids[0, 1:, None]).sum()), abs=1e-3)
    windows = scorer.rolling_windows(tokens, window=16)
    assert [t for _, cont in windows for t in cont] == tokens
    assert all(len(ctx) + len(cont) <= 17 for ctx, cont in windows)
    windowed, n2 = scorer.rolling_loglikelihood([text], window=16)[0]
    assert n2 == len(tokens) and windowed < 0 and windowed != pytest.approx(whole, abs=1e-6)


def test_bad_arguments_are_one_line_errors():
    from recoup.errors import RecoupError

    lm = tiny_loaded("llama")
    with pytest.raises(RecoupError):
        Scorer(lm.model, lm.tokenizer, batch_size=0)
    scorer = Scorer(lm.model, lm.tokenizer, progress=False, max_length=16)
    with pytest.raises(RecoupError, match="max_new_tokens"):
        scorer.generate(["x"], max_new_tokens=0)
    with pytest.raises(RecoupError, match="does not fit"):
        scorer.loglikelihood([("a", "b" * 40)])


def test_a_window_of_max_length_tokens_fits_and_stops_cut_anywhere_for_lm_eval():
    """lm-eval's bound: context + continuation may be max_length + 1 tokens (the last is never an input), so
    rolling windows of max_length tokens score; stop strings are looked for anywhere when asked."""
    from recoup.errors import RecoupError
    from recoup.evaluate.scorer import _cut

    lm = tiny_loaded("llama")
    scorer = Scorer(lm.model, lm.tokenizer, progress=False, max_length=16)
    assert len(scorer.loglikelihood([("a", "b" * 16)])) == 1
    with pytest.raises(RecoupError, match="does not fit"):
        scorer.loglikelihood([("a", "b" * 17)])
    ((total, count),) = scorer.rolling_loglikelihood(["abcdefghij" * 5])
    assert count == 50 and total < 0
    assert _cut("\nParis\nx", ["\n"]) == "\nParis" and _cut("\nParis\nx", ["\n"], after_space=False) == ""
