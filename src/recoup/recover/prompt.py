"""What the prompt recoveries share (soft prompts, IDP pools): the prompt keys, their initialisation and the
frozen backbone they train against.

A prompt is ``n`` virtual token embeddings, (n, H), put in front of the input embeddings of a frozen model
(a pool is several of them, (m, n, H)). Initialisation (``init``): rows of frequent training tokens (Lester et
al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"), the embeddings of a text, or random rows
at the embedding matrix's scale. A shared module, not a method: it defines no ``METHOD``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
from torch import nn

from recoup.config import check
from recoup.errors import RecoupError
from recoup.recover.train import FitConfig

INITS = ("vocab", "text", "random")


@dataclasses.dataclass
class PromptConfig(FitConfig):
    """The prompt keys (length, initialisation); the training keys (data/task, steps, lr, ...) are
    :class:`~recoup.recover.train.FitConfig`'s."""

    tokens: int = 20  # prompt length n
    init: str = "vocab"  # vocab (rows of frequent tokens) | text | random
    init_text: str | None = None

    def __post_init__(self) -> None:
        check(self.tokens >= 1, f"tokens must be >= 1 (got {self.tokens})")
        check(self.init in INITS, f"unknown init '{self.init}'; use one of {', '.join(INITS)}")
        check(self.init != "text" or bool(self.init_text), "init 'text' needs init_text")
        super().__post_init__()


@contextlib.contextmanager
def frozen(model: nn.Module):
    """Backbone frozen (no grads, eval mode) for the duration; flags restored in ``finally``."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def init_embeddings(model: nn.Module, tokenizer, config, train_ids: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows, H) initial prompt: rows of frequent training tokens (Lester et al.), a text, or random."""
    emb = model.get_input_embeddings().weight.detach().float().cpu()
    gen = torch.Generator().manual_seed(config.seed)
    if config.init == "text":
        ids = tokenizer(config.init_text, add_special_tokens=False).input_ids
        if not ids:
            raise RecoupError("init_text tokenizes to nothing")
        ids = (ids * math.ceil(rows / len(ids)))[:rows]
        return emb[torch.tensor(ids)].clone()
    if config.init == "vocab":
        counts = torch.bincount(train_ids, minlength=emb.shape[0])[: emb.shape[0]]
        common = torch.argsort(counts, descending=True)[: max(rows, 5000)]
        common = common[counts[common] > 0]
        pick = common[torch.randperm(common.numel(), generator=gen)[:rows]]
        if pick.numel() < rows:  # tiny corpora: repeat
            pick = pick.repeat(math.ceil(rows / pick.numel()))[:rows]
        return emb[pick].clone()
    return torch.randn(rows, emb.shape[1], generator=gen) * emb.std()


def model_meta(loaded) -> dict:
    cfg = loaded.model.config
    return {
        "base_model": str(loaded.source),
        "hidden_size": int(loaded.model.get_input_embeddings().weight.shape[1]),
        "num_attention_heads": getattr(cfg, "num_attention_heads", None),
        "num_layers": getattr(cfg, "num_hidden_layers", None),
        "model_type": getattr(cfg, "model_type", None),
    }
