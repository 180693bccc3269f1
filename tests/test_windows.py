import torch
from helpers import tiny_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers

from recoup.data import windows
from recoup.data.windows import tokenize_corpus

TEXT = "the cat sat on the mat. " * 50


def counting(tok):
    calls = []
    real = tok.__class__.__call__

    class Counting(tok.__class__):
        def __call__(self, *a, **k):
            calls.append(1)
            return real(self, *a, **k)

    tok.__class__ = Counting
    return tok, calls


def test_the_same_tokenizer_loaded_anew_reuses_the_ids_and_anything_else_does_not(monkeypatch):
    monkeypatch.setattr(windows, "_TOKENIZED", windows.OrderedDict())
    first, calls = counting(tiny_tokenizer())
    ids = tokenize_corpus(first, TEXT)
    assert calls == [1] and ids.shape == (len(TEXT),)
    ids[0] = -1  # a caller's change does not reach the kept ids
    again, calls2 = counting(tiny_tokenizer())  # another object, same tokenizer
    assert torch.equal(tokenize_corpus(again, TEXT)[1:], ids[1:])
    assert calls2 == [] and int(tokenize_corpus(again, TEXT)[0]) != -1
    tokenize_corpus(again, TEXT + "!")  # another text
    assert calls2 == [1]
    other = tiny_tokenizer()  # another vocabulary: other ids, its own entry
    vocab = {c: i for i, c in enumerate(sorted(set(TEXT)) + ["<unk>"])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    other._tokenizer = tk
    assert not torch.equal(tokenize_corpus(other, TEXT)[1:], ids[1:])  # ([0] was changed above)


def test_at_most_keep_texts_are_kept(monkeypatch):
    monkeypatch.setattr(windows, "_TOKENIZED", windows.OrderedDict())
    tok = tiny_tokenizer()
    for i in range(windows.TOKENIZED_KEEP + 3):
        tokenize_corpus(tok, f"text {i}")
    assert len(windows._TOKENIZED) == windows.TOKENIZED_KEEP
