"""The BOS policy (recoup.data.bos): a model whose tokenizer adds a BOS gets exactly one at the start of every
perplexity, calibration and training window and every Scorer request, never scored, windows still ``seqlen``
long; a tokenizer that adds none (like the bundled SmolLM2's) sees exactly what it saw before."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import bos_tokenizer, tiny_model, tiny_tokenizer
from test_run import write_corpus

from recoup.data.bos import bos_id, tokenizer_bos, with_bos
from recoup.data.calibration import calibration_windows
from recoup.data.windows import consecutive_windows, corpus_ids
from recoup.errors import RecoupError
from recoup.evaluate.perplexity import perplexity
from recoup.evaluate.scorer import Scorer
from recoup.recover.task_data import tuning_data

BOS = 1  # "<s>" in the tiny vocabulary


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return str(write_corpus(tmp_path_factory.mktemp("bos") / "text.txt", n_words=400))


def test_detects_what_the_tokenizer_does():
    assert tokenizer_bos(bos_tokenizer()) == BOS
    assert tokenizer_bos(bos_tokenizer("</s>")) == 2  # OPT: its BOS is </s>
    assert tokenizer_bos(tiny_tokenizer()) is None  # has a bos_token, but does not add it (like SmolLM2's)
    assert bos_id(tiny_tokenizer(), "always") == BOS and bos_id(bos_tokenizer(), "never") is None
    with pytest.raises(RecoupError, match="unknown bos policy 'sometimes'"):
        bos_id(tiny_tokenizer(), "sometimes")
    tok = tiny_tokenizer()
    tok.bos_token = None
    with pytest.raises(RecoupError, match="no BOS token"):
        bos_id(tok, "always")


def test_with_bos_never_doubles():
    assert with_bos([5, 6, 7], BOS, 3) == [BOS, 6, 7]
    assert with_bos([BOS, 5, 6, 7], BOS, 10) == [BOS, 5, 6, 7]
    assert with_bos([], BOS, 4) == [BOS]
    assert with_bos([5, 6, 7], None, 2) == [6, 7]


def _one_bos_first(rows) -> bool:
    return all(r[0] == BOS and list(r).count(BOS) == 1 for r in rows)


def test_perplexity_windows_start_with_one_unscored_bos(corpus):
    model, tok = tiny_model("llama"), bos_tokenizer()
    seen: list[torch.Tensor] = []
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    try:
        res = perplexity(model, tok, corpus, "test", seqlen=16, limit=3)
    finally:
        hook.remove()
    rows = torch.cat(seen)
    assert rows.shape == (3, 16) and _one_bos_first(rows.tolist())
    assert res.tokens == 3 * 15 and res.protocol["bos"] == "auto" and res.protocol["bos_token_id"] == BOS
    ids = corpus_ids(tok, corpus, "test")
    assert torch.equal(rows[:, 1:].flatten(), ids[: 3 * 15])  # every text token once, none skipped
    with torch.no_grad():  # reference: the BOS predicts the first text token; nothing predicts the BOS
        logits = model(rows).logits[:, :-1]
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1), reduction="mean")
    assert res.nll == pytest.approx(float(ref), rel=1e-5)
    never = perplexity(model, tok, corpus, "test", seqlen=16, limit=3, bos="never")
    plain = perplexity(model, tiny_tokenizer(), corpus, "test", seqlen=16, limit=3)
    assert never.nll == plain.nll and plain.protocol["bos_token_id"] is None and never.protocol["bos"] == "never"
    assert plain.nll != res.nll


def test_no_bos_tokenizer_windows_unchanged(corpus):
    tok = tiny_tokenizer()
    ids = corpus_ids(tok, corpus, "train")
    assert torch.equal(consecutive_windows(ids, 16, 4), ids[: 4 * 16].view(4, 16))
    cal = calibration_windows(tok, corpus, nsamples=5, seqlen=16, seed=3)
    starts = torch.randint(0, ids.numel() - 16, (5,), generator=torch.Generator().manual_seed(3)).tolist()
    assert torch.equal(cal.input_ids, torch.stack([ids[s : s + 16] for s in starts]))  # the draw of old
    assert cal.protocol["bos"] == "auto" and cal.protocol["bos_token_id"] is None


def test_calibration_windows_start_with_one_bos(corpus):
    cal = calibration_windows(bos_tokenizer(), corpus, nsamples=6, seqlen=16, seed=0)
    assert cal.input_ids.shape == (6, 16) and _one_bos_first(cal.input_ids.tolist())
    assert cal.protocol["bos"] == "auto" and cal.protocol["bos_token_id"] == BOS
    forced = calibration_windows(tiny_tokenizer(), corpus, nsamples=2, seqlen=16, bos="always")
    assert _one_bos_first(forced.input_ids.tolist())
    never = calibration_windows(bos_tokenizer(), corpus, nsamples=2, seqlen=16, bos="never")
    assert (never.input_ids != BOS).all()


def test_training_windows_and_sequences_start_with_one_unscored_bos(corpus, tmp_path):
    tok = bos_tokenizer()
    data = tuning_data(tok, data=corpus, max_len=16, seed=0)
    assert data.protocol["bos_token_id"] == BOS
    batch = next(data.batches(3, 0, seed=0))
    assert batch.input_ids.shape == (3, 16) and _one_bos_first(batch.input_ids.tolist())
    assert (batch.labels[:, 0] == -100).all() and torch.equal(batch.labels[:, 1:], batch.input_ids[:, 1:])
    assert _one_bos_first([s.ids for s in data.valid]) and all(len(s.ids) == 16 for s in data.valid)
    assert (data.token_ids() != BOS).all()
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": "<s>q: ab", "completion": " c"}, {"prompt": "", "completion": " dd"}, {"text": "hello there"}]
    path.write_text("\n".join(json.dumps(r) for r in rows * 4))
    seqs = tuning_data(tok, data=str(path), max_len=8, seed=0).train + tuning_data(tok, data=str(path), max_len=8).valid
    assert _one_bos_first([s.ids for s in seqs]) and all(len(s.ids) <= 8 for s in seqs)
    for s in seqs:  # the BOS and the context are never scored; the completion (or the whole text) is
        text = tok.decode(s.ids[s.first_scored :])
        assert s.first_scored >= 1 and text in (" c", " dd", "hello t")
    plain = tuning_data(tiny_tokenizer(), data=corpus, max_len=16, seed=0)
    assert plain.protocol["bos_token_id"] is None and (next(plain.batches(3, 0, seed=0)).input_ids != BOS).all()


def _recording(scorer: Scorer) -> list[list[int]]:
    rows: list[list[int]] = []
    run = scorer._prefill

    def prefill(batch, *args, **kwargs):
        rows.extend(list(r) for r in batch)
        return run(batch, *args, **kwargs)

    scorer._prefill = prefill
    return rows


def test_scorer_requests_get_exactly_one_bos():
    model, tok = tiny_model("llama"), bos_tokenizer()
    scorer = Scorer(model, tok, batch_size=4, progress=False, max_length=64)
    rows = _recording(scorer)
    reqs = [("ab", " c"), ("ab", " d"), ("", "xy"), ("<s>Q: hi", " yes"), ("<s>Q: hi", " no")]
    scores = scorer.loglikelihood(reqs)
    assert rows and _one_bos_first(rows)  # the chat-style "<s>" context is not given a second BOS
    x = torch.tensor([[BOS] + scorer.encode("ab c")])
    with torch.no_grad():
        logp = torch.log_softmax(model(x).logits[0].float(), -1)
    assert scores[0][0] == pytest.approx(float(logp[2, x[0, 3]] + logp[3, x[0, 4]]), abs=1e-4)
    rows.clear()
    scorer.generate(["ab", "<s>ab"], max_new_tokens=2)
    assert rows == [[BOS] + scorer.encode("ab")] * 2
    rows.clear()
    text = "the quick brown fox jumps over the lazy dog"
    total, n = scorer.rolling_loglikelihood([text], window=8)[0]
    assert n == len(scorer.encode(text)) and _one_bos_first(rows)
    plain = Scorer(model, tiny_tokenizer(), batch_size=4, progress=False, max_length=64)
    prow = _recording(plain)
    plain.loglikelihood([("ab", " c")])
    assert prow == [plain.encode("ab c")]  # a tokenizer that adds no BOS: the request as before


def test_bos_is_a_key_of_every_stage():
    from recoup.recipe.jobs import EvalJob, keys

    for kind in ("compress", "evaluate", "recover"):
        assert "bos" in [k.name for k in keys(kind)]
    with pytest.raises(RecoupError, match="unknown bos policy"):
        EvalJob(bos="yes")


def test_bos_is_a_recipe_key_of_every_step(tmp_path):
    import yaml
    from test_run import tiny_recipe

    from recoup.recipe import load_recipe
    from recoup.runs.plan import build_plan

    raw = yaml.safe_load(tiny_recipe(tmp_path).read_text())
    raw["evaluate"]["bos"] = "never"
    raw["compress"][0]["bos"] = "always"
    raw["recover"][0]["bos"] = "never"
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(raw))
    plan = {s.name: s.params for s in build_plan(load_recipe(tmp_path / "b.yaml"), "fp")}
    assert plan["eval:dense"]["bos"] == "never" and plan["compress:8x"]["bos"] == "always"
    assert plan["recover:prompt"]["bos"] == "never" and plan["compress:s60"]["bos"] == "auto"
    raw["evaluate"]["bos"] = "maybe"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(RecoupError, match="unknown bos policy 'maybe'"):
        load_recipe(tmp_path / "c.yaml")
