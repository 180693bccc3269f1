"""Latency of greedy decoding at batch 1, with a recovery attached: prefill and per-token decode.

Prefill is the recovery's ``prefix`` computation (e.g. IDP's prompt selection) plus one forward over prefix +
prompt that fills the KV cache; decode is ``new_tokens`` single-token forwards over that cache. Each is the
median of ``repeats`` runs after one warm-up run, in milliseconds, with the thread count recorded.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Sequence

import torch
from torch import nn

from recoup.errors import RecoupError
from recoup.model.forward import CACHE_ARG, build_inputs, output_cache


@dataclasses.dataclass
class LatencyConfig:
    prompt_len: int = 128
    new_tokens: int = 32
    repeats: int = 3

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.new_tokens < 1 or self.repeats < 1:
            raise RecoupError("--prompt-len, --new-tokens and --repeats must be positive")


@torch.no_grad()
def measure_latency(
    model: nn.Module, input_ids: torch.Tensor, recovery=None, cfg: LatencyConfig = LatencyConfig()
) -> dict:
    """Median prefill and per-token decode milliseconds of greedy decoding, batch 1 (+ the generated ids).

    input_ids: (1, T); ``model`` already has the recovery's adapters attached (``recovery.apply``).
    """
    model.eval()
    embed = model.get_input_embeddings()
    mask0 = torch.ones_like(input_ids)
    prefill, decode = [], []
    for rep in range(cfg.repeats + 1):  # the first run warms up
        t0 = time.perf_counter()
        prefix = recovery.prefix(model, input_ids, mask0) if recovery is not None else None
        kw = build_inputs(model, input_ids, mask0, prefix)
        out = model(**kw, use_cache=True)
        t1 = time.perf_counter()
        past_mask, cache = kw["attention_mask"], output_cache(out)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        generated = [int(tok)]
        for _ in range(cfg.new_tokens):
            mask = torch.cat([past_mask, past_mask.new_ones((1, 1))], dim=1)
            position_ids = past_mask.sum(-1, keepdim=True)
            out = model(
                inputs_embeds=embed(tok),
                attention_mask=mask,
                position_ids=position_ids,
                **{CACHE_ARG: cache},
                use_cache=True,
            )
            cache, past_mask = output_cache(out), mask
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            generated.append(int(tok))
        t2 = time.perf_counter()
        if rep:
            prefill.append(t1 - t0)
            decode.append((t2 - t1) / cfg.new_tokens)
    return {
        "prefill_ms": 1000 * statistics.median(prefill),
        "decode_ms_per_token": 1000 * statistics.median(decode),
        "prompt_len": int(input_ids.shape[1]),
        "new_tokens": cfg.new_tokens,
        "repeats": cfg.repeats,
        "threads": torch.get_num_threads(),
        "generated": generated[:-1],
    }


def prompt_ids(tokenizer, texts: Sequence[str], length: int) -> torch.Tensor:
    """A fixed prompt of exactly ``length`` tokens, (1, length): ``texts`` encoded one after another and cut."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) >= length:
            break
    if len(ids) < length:
        raise RecoupError(f"the texts hold {len(ids)} tokens, fewer than --prompt-len {length}")
    return torch.tensor([ids[:length]])
