"""Perplexity with the GPTQ/SparseGPT protocol.

Join the split, tokenize once, cut non-overlapping windows of ``seqlen`` tokens (the tail that
does not fill a window is dropped; :func:`recoup.data.windows.consecutive_windows`), mean next-token
NLL over all predicted tokens (:meth:`recoup.evaluate.scorer.Scorer.window_nll`), exp. With a recovery
attached, its prefix is prepended to every window and never scored. Under the BOS policy
(:mod:`recoup.data.bos`) a window of a model whose tokenizer adds a BOS is that BOS + ``seqlen - 1`` text
tokens: the BOS is not scored, every text token is.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

from recoup.data.bos import bos_id
from recoup.data.corpora import describe_corpus, normalize_split
from recoup.data.windows import consecutive_windows, corpus_ids, text_per_window
from recoup.errors import RecoupError

log = logging.getLogger(__name__)

PROTOCOL = "GPTQ: joined split, tokenized once, non-overlapping windows, mean token NLL"


@dataclasses.dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int
    windows: int
    protocol: dict

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "nll": self.nll, "tokens": self.tokens, "windows": self.windows, **self.protocol}


def perplexity(
    model,
    tokenizer,
    corpus: str = "ptb",
    split: str = "test",
    seqlen: int = 2048,
    limit: int | None = None,
    batch_size: int = 1,
    recovery=None,
    attached: bool = False,
    bos: str = "auto",
) -> PerplexityResult:
    """Perplexity of ``model`` on a corpus split (GPTQ protocol); the result records the protocol.

    ``bos``: the BOS policy (auto | always | never). ``attached``: the caller already ran
    ``recovery.apply(model)`` (see :class:`~recoup.evaluate.scorer.Scorer`)."""
    from recoup.evaluate.scorer import Scorer

    if seqlen < 2:
        raise RecoupError(f"--seqlen must be at least 2 (got {seqlen})")
    if limit is not None and limit < 1:
        raise RecoupError(f"--limit must be at least 1 window (got {limit})")
    split = normalize_split(split)
    bid = bos_id(tokenizer, bos)
    started = time.time()
    ids = corpus_ids(tokenizer, corpus, split)
    windows = consecutive_windows(ids, seqlen, limit, bid)
    scorer = Scorer(model, tokenizer, recovery, batch_size=batch_size, attached=attached)
    total, tokens = scorer.window_nll(windows)
    nll, n = total / tokens, windows.shape[0]
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    protocol = {
        "corpus": corpus,
        "description": describe_corpus(corpus),
        "split": split,
        "seqlen": seqlen,
        "windows_available": ids.numel() // text_per_window(seqlen, bid),
        "limit": limit,
        "dtype": dtype,
        "bos": bos,
        "bos_token_id": bid,
        "protocol": PROTOCOL,
    }
    log.info(
        "ppl:%s %s windows=%d tokens=%d ppl=%.3f (%.1fs)",
        corpus,
        split,
        n,
        tokens,
        math.exp(nll),
        time.time() - started,
    )
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=tokens, windows=n, protocol=protocol)
