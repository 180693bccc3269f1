"""Seeded calibration windows, as in GPTQ/SparseGPT: random ``seqlen``-token windows of a corpus' train split.

Under the BOS policy (:mod:`recoup.data.bos`) every window starts with the model's BOS when its tokenizer
adds one (``auto``), still ``seqlen`` positions in all; the record says which."""

from __future__ import annotations

import dataclasses

import torch

from recoup.data.bos import bos_id
from recoup.data.corpora import describe_corpus
from recoup.data.windows import corpus_ids, random_windows, text_per_window
from recoup.errors import RecoupError


@dataclasses.dataclass
class Calibration:
    """Token windows (nsamples, seqlen) and the protocol that produced them."""

    input_ids: torch.Tensor
    corpus: str
    split: str
    seqlen: int
    seed: int
    bos: str = "auto"
    bos_token_id: int | None = None

    @property
    def protocol(self) -> dict:
        return {
            "corpus": self.corpus,
            "description": describe_corpus(self.corpus),
            "split": self.split,
            "nsamples": int(self.input_ids.shape[0]),
            "seqlen": self.seqlen,
            "seed": self.seed,
            "bos": self.bos,
            "bos_token_id": self.bos_token_id,
        }


def calibration_windows(
    tokenizer,
    corpus: str = "ptb",
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    split: str = "train",
    bos: str = "auto",
) -> Calibration:
    """``nsamples`` windows of ``seqlen`` positions at seeded random offsets of the corpus' split (BOS first
    when the ``bos`` policy adds one)."""
    if nsamples < 1 or seqlen < 2:
        raise RecoupError(f"calibration needs nsamples >= 1 and seqlen >= 2 (got {nsamples}, {seqlen})")
    bid = bos_id(tokenizer, bos)
    ids = corpus_ids(tokenizer, corpus, split)
    if ids.numel() <= text_per_window(seqlen, bid):
        raise RecoupError(f"calibration corpus '{corpus}' has {ids.numel()} tokens, fewer than seqlen {seqlen}")
    windows = random_windows(ids, seqlen, nsamples, torch.Generator().manual_seed(seed), bid)
    return Calibration(
        input_ids=windows, corpus=corpus, split=split, seqlen=seqlen, seed=seed, bos=bos, bos_token_id=bid
    )
