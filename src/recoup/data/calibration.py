"""Seeded calibration windows, as in GPTQ/SparseGPT: random ``seqlen``-token windows of a corpus' train split."""

from __future__ import annotations

import dataclasses

import torch

from recoup.data.corpora import describe_corpus, load_corpus
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


def tokenize_corpus(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole corpus once (no special tokens added): a 1-D long tensor."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0]
    return ids


def calibration_windows(tokenizer, corpus: str = "ptb", nsamples: int = 128, seqlen: int = 2048,
                        seed: int = 0, split: str = "train") -> Calibration:
    """``nsamples`` windows of ``seqlen`` tokens at seeded random offsets of the corpus' split."""
    if nsamples < 1 or seqlen < 2:
        raise RecoupError(f"calibration needs nsamples >= 1 and seqlen >= 2 (got {nsamples}, {seqlen})")
    ids = tokenize_corpus(tokenizer, load_corpus(corpus, split))
    if ids.numel() <= seqlen:
        raise RecoupError(f"calibration corpus '{corpus}' has {ids.numel()} tokens, fewer than seqlen {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
    windows = torch.stack([ids[s: s + seqlen] for s in starts.tolist()])
    return Calibration(input_ids=windows, corpus=corpus, split=split, seqlen=seqlen, seed=seed)
