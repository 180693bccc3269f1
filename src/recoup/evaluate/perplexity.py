"""Perplexity with the GPTQ/SparseGPT protocol.

Join the split, tokenize once, cut non-overlapping windows of ``seqlen`` tokens (the tail that
does not fill a window is dropped), mean next-token NLL over all predicted tokens, exp. With a
recovery attached, its prefix is prepended to every window and never scored.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from recoup.data.calibration import tokenize_corpus
from recoup.data.corpora import describe_corpus, load_corpus, normalize_split
from recoup.errors import RecoupError
from recoup.model.forward import forward_logits

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int
    windows: int
    protocol: dict

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "nll": self.nll, "tokens": self.tokens, "windows": self.windows, **self.protocol}


@torch.no_grad()
def perplexity_of_ids(model, ids: torch.Tensor, seqlen: int = 2048, limit: int | None = None, batch_size: int = 1,
                      recovery=None, progress: bool = True) -> tuple[float, int, int]:
    """(mean NLL, scored tokens, windows) over non-overlapping windows of a 1-D id tensor."""
    n = ids.numel() // seqlen
    if limit is not None:
        n = min(n, limit)
    if n < 1:
        raise RecoupError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    windows = ids[: n * seqlen].view(n, seqlen)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in tqdm(range(0, n, batch_size), desc="perplexity", unit="batch", disable=not progress, leave=False):
        x = windows[start: start + batch_size].to(device)
        prefix = recovery.prefix(model, x, torch.ones_like(x)) if recovery is not None else None
        logits = forward_logits(model, x, None, prefix)[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += x[:, 1:].numel()
    return total / count, count, n


def perplexity(model, tokenizer, corpus: str = "ptb", split: str = "test", seqlen: int = 2048,
               limit: int | None = None, batch_size: int = 1, recovery=None) -> PerplexityResult:
    """Perplexity of ``model`` on a corpus split (GPTQ protocol); the result records the protocol."""
    if seqlen < 2:
        raise RecoupError(f"--seqlen must be at least 2 (got {seqlen})")
    if limit is not None and limit < 1:
        raise RecoupError(f"--limit must be at least 1 window (got {limit})")
    split = normalize_split(split)
    started = time.time()
    ids = tokenize_corpus(tokenizer, load_corpus(corpus, split))
    nll, tokens, n = perplexity_of_ids(model, ids, seqlen, limit, batch_size, recovery)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    protocol = {"corpus": corpus, "description": describe_corpus(corpus), "split": split, "seqlen": seqlen,
                "windows_available": ids.numel() // seqlen, "limit": limit, "dtype": dtype,
                "protocol": "GPTQ: joined split, tokenized once, non-overlapping windows, mean token NLL"}
    log.info("ppl:%s %s windows=%d tokens=%d ppl=%.3f (%.1fs)", corpus, split, n, tokens, math.exp(nll),
             time.time() - started)
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=tokens, windows=n, protocol=protocol)
