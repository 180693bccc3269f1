"""Seeded calibration windows, as in GPTQ/SparseGPT: random ``seqlen``-token windows of a corpus' train split."""

from __future__ import annotations

import dataclasses

import torch

from recoup.data.corpora import describe_corpus
from recoup.data.windows import corpus_ids, random_windows
from recoup.errors import RecoupError


@dataclasses.dataclass
class Calibration:
    """Token windows (nsamples, seqlen) and the protocol that produced them."""

    input_ids: torch.Tensor
    corpus: str
    split: str
    seqlen: int
    seed: int

    @property
    def protocol(self) -> dict:
        return {"corpus": self.corpus, "description": describe_corpus(self.corpus), "split": self.split,
                "nsamples": int(self.input_ids.shape[0]), "seqlen": self.seqlen, "seed": self.seed}


def calibration_windows(tokenizer, corpus: str = "ptb", nsamples: int = 128, seqlen: int = 2048,
                        seed: int = 0, split: str = "train") -> Calibration:
    """``nsamples`` windows of ``seqlen`` tokens at seeded random offsets of the corpus' split."""
    if nsamples < 1 or seqlen < 2:
        raise RecoupError(f"calibration needs nsamples >= 1 and seqlen >= 2 (got {nsamples}, {seqlen})")
    ids = corpus_ids(tokenizer, corpus, split)
    if ids.numel() <= seqlen:
        raise RecoupError(f"calibration corpus '{corpus}' has {ids.numel()} tokens, fewer than seqlen {seqlen}")
    windows = random_windows(ids, seqlen, nsamples, torch.Generator().manual_seed(seed))
    return Calibration(input_ids=windows, corpus=corpus, split=split, seqlen=seqlen, seed=seed)
