import math

import pytest
import torch
import torch.nn.functional as F
from helpers import needs_packs, tiny_loaded

from recoup import RecoupError
from recoup.evaluate.perplexity import perplexity


def _manual_ppl(model, ids, seqlen):
    n = ids.numel() // seqlen
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(n):
            x = ids[i * seqlen : (i + 1) * seqlen][None]
            logits = model(x).logits[:, :-1]
            total += F.cross_entropy(logits[0], x[0, 1:], reduction="sum").item()
            count += seqlen - 1
    return math.exp(total / count), count, n


def test_ppl_matches_manual_windows_and_records_protocol(tmp_path):
    lm = tiny_loaded("llama")
    text = "the quick brown fox jumps over the lazy dog. " * 12
    f = tmp_path / "corpus.txt"
    f.write_text(text)
    res = perplexity(lm.model, lm.tokenizer, str(f), "test", seqlen=64)
    ids = lm.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    ppl, count, n = _manual_ppl(lm.model, ids, 64)
    assert res.windows == n == len(text) // 64
    assert res.tokens == count
    assert res.ppl == pytest.approx(ppl, rel=1e-5)
    assert res.protocol["seqlen"] == 64 and res.protocol["split"] == "test" and res.protocol["dtype"] == "float32"
    limited = perplexity(lm.model, lm.tokenizer, str(f), "test", seqlen=64, limit=2)
    assert limited.windows == 2 and limited.tokens == 2 * 63


def test_ppl_errors_are_clear(tmp_path):
    lm = tiny_loaded("llama")
    f = tmp_path / "short.txt"
    f.write_text("tiny")
    with pytest.raises(RecoupError, match="fewer than one window"):
        perplexity(lm.model, lm.tokenizer, str(f), seqlen=64)
    with pytest.raises(RecoupError, match="unknown corpus 'pbt'; did you mean 'ptb'"):
        perplexity(lm.model, lm.tokenizer, "pbt")
    with pytest.raises(RecoupError, match="corpus file not found"):
        perplexity(lm.model, lm.tokenizer, str(tmp_path / "missing.txt"))


@needs_packs
def test_corpora_from_installed_packs_have_disjoint_splits():
    from recoup.data.corpora import load_corpus, wiki_passages

    ptb_test = load_corpus("ptb", "test")
    assert ptb_test.startswith("no it was n't black monday but while")
    assert "\n" not in ptb_test
    train, valid, test = (set(wiki_passages(s)) for s in ("train", "valid", "test"))
    assert train and valid and test
    assert not (train & test) and not (train & valid) and not (valid & test)
