"""The one place that cuts token windows out of a corpus: calibration, perplexity, prompts and adapters.

- :func:`corpus_ids`: a corpus (or a comma-separated mix, or a text file) tokenized once, 1-D;
- :func:`random_windows`: windows at seeded random offsets (GPTQ/SparseGPT calibration; training batches);
- :func:`consecutive_windows`: the first non-overlapping windows (GPTQ perplexity; validation).

``bos`` (an id from :func:`recoup.data.bos.bos_id`, or None): every window starts with that one BOS and
still holds ``seqlen`` positions, so ``seqlen - 1`` text tokens follow it; the BOS is never scored (a
window's first position never is), so every text token of a window is. With None, windows are plain
``seqlen``-token slices (their first token unscored), exactly as before.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import torch

from recoup.data.corpora import load_corpus
from recoup.errors import RecoupError
from recoup.memory import trim_heap

_TOKENIZED: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()  # (tokenizer, text) digests -> ids
TOKENIZED_KEEP = 8  # texts kept (PTB train is 1.1M tokens, 9 MB)


def _tokenizer_digest(tokenizer) -> str | None:
    """A digest of everything a fast tokenizer encodes with (its serialized vocabulary, merges, normalizer,
    pre-tokenizer, added tokens); None for a tokenizer without one (not cached)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    split = getattr(tokenizer, "split_special_tokens", None)  # set on the Python side, changes encoding
    return hashlib.sha256(f"{type(tokenizer).__qualname__}\0{split}\0{backend.to_str()}".encode()).hexdigest()


def tokenize_corpus(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole text once (no special tokens added): a 1-D long tensor.

    A run's stages tokenize the same corpora again (PTB train for calibration, training and EoRA), so the ids
    of the last :data:`TOKENIZED_KEEP` texts are kept in this process, keyed by the tokenizer's and the text's
    digests (the same tokenizer loaded anew hits; another one, or a changed text, does not). Callers get a
    copy."""
    tok = _tokenizer_digest(tokenizer)
    key = (tok, hashlib.sha256(text.encode()).hexdigest()) if tok is not None else None
    if key is not None and key in _TOKENIZED:
        _TOKENIZED.move_to_end(key)
        return _TOKENIZED[key].clone()
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0]
    trim_heap()  # the tokenizer's per-token objects (about 0.5 GB for PTB train) are freed: give them back
    if key is not None:
        _TOKENIZED[key] = ids.clone()
        while len(_TOKENIZED) > TOKENIZED_KEEP:
            _TOKENIZED.popitem(last=False)
    return ids


def corpus_names(data: str) -> list[str]:
    """``"ptb,wiki"`` -> ``["ptb", "wiki"]`` (a single name or file path stays one item)."""
    names = [d.strip() for d in str(data).split(",") if d.strip()]
    if not names:
        raise RecoupError("no corpus named; give ptb, wiki, a .txt/.jsonl file or a comma-separated mix")
    return names


def corpus_ids(tokenizer, data: str, split: str, split_files: bool = False) -> torch.Tensor:
    """Token ids of one corpus or a comma-separated mix for ``split``.

    A text file is used whole (perplexity, calibration), or with ``split_files`` (training, which needs a
    validation part) cut into its first 90% (``train``) and last 10% (``valid``/``test``)."""
    parts = []
    for name in corpus_names(data):
        is_file = Path(name).expanduser().is_file()
        ids = tokenize_corpus(tokenizer, load_corpus(name, "train" if is_file else split))
        if is_file and split_files:
            cut = int(ids.numel() * 0.9)
            ids = ids[:cut] if split == "train" else ids[cut:]
        parts.append(ids)
    return torch.cat(parts)


def text_per_window(seqlen: int, bos: int | None = None) -> int:
    """Text tokens in a window of ``seqlen`` positions: ``seqlen``, or ``seqlen - 1`` after a BOS."""
    width = seqlen - (bos is not None)
    if width < 1:
        raise RecoupError(f"a window of {seqlen} positions leaves no room for text after the BOS")
    return width


def _prepend(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows], dim=1)


def random_windows(
    ids: torch.Tensor, seqlen: int, count: int, generator: torch.Generator, bos: int | None = None
) -> torch.Tensor:
    """(count, seqlen) windows at random offsets of a 1-D id tensor, drawn from ``generator`` (BOS first if set)."""
    width = text_per_window(seqlen, bos)
    if ids.numel() <= width:
        raise RecoupError(f"the text has {ids.numel()} tokens, fewer than one window of {width}")
    starts = torch.randint(0, ids.numel() - width, (count,), generator=generator).tolist()
    return _prepend(torch.stack([ids[s : s + width] for s in starts]), bos)


def window_stream(
    ids: torch.Tensor, seqlen: int, batch_size: int, seed: int, bos: int | None = None
) -> Iterator[torch.Tensor]:
    """Endless (batch_size, seqlen) batches of :func:`random_windows` from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield random_windows(ids, seqlen, batch_size, gen, bos)


def consecutive_windows(
    ids: torch.Tensor, seqlen: int, limit: int | None = None, bos: int | None = None
) -> torch.Tensor:
    """The first non-overlapping windows (at most ``limit``): (n, seqlen), BOS first if set; the tail that does
    not fill one is dropped."""
    width = text_per_window(seqlen, bos)
    n = ids.numel() // width
    if limit is not None:
        n = min(n, limit)
    if n < 1:
        raise RecoupError(f"the text has {ids.numel()} tokens, fewer than one window of {width}")
    return _prepend(ids[: n * width].view(n, width), bos)
