"""The one place that cuts token windows out of a corpus: calibration, perplexity, prompts and adapters.

- :func:`corpus_ids`: a corpus (or a comma-separated mix, or a text file) tokenized once, 1-D;
- :func:`random_windows`: windows at seeded random offsets (GPTQ/SparseGPT calibration; training batches);
- :func:`consecutive_windows`: the first non-overlapping windows (GPTQ perplexity; validation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from recoup.data.corpora import load_corpus
from recoup.errors import RecoupError


def tokenize_corpus(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole text once (no special tokens added): a 1-D long tensor."""
    return tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0]


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


def random_windows(ids: torch.Tensor, seqlen: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """(count, seqlen) windows at random offsets of a 1-D id tensor, drawn from ``generator``."""
    if ids.numel() <= seqlen:
        raise RecoupError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    starts = torch.randint(0, ids.numel() - seqlen, (count,), generator=generator).tolist()
    return torch.stack([ids[s: s + seqlen] for s in starts])


def window_stream(ids: torch.Tensor, seqlen: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless (batch_size, seqlen) batches of :func:`random_windows` from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield random_windows(ids, seqlen, batch_size, gen)


def consecutive_windows(ids: torch.Tensor, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """The first non-overlapping windows (at most ``limit``): (n, seqlen); the tail that does not fill one is dropped."""
    n = ids.numel() // seqlen
    if limit is not None:
        n = min(n, limit)
    if n < 1:
        raise RecoupError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)
