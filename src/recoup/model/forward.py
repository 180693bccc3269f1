"""The one forward used by evaluation and recovery: input ids, an optional embedding prefix.

A recovery that works through the input (a soft prompt, an IDP-selected prompt) hands a
prefix of input embeddings, shape (B, P, H) or (P, H); adapters change the model itself and pass
no prefix. Positions are derived from the attention mask, so left padding and prefixes work
for every architecture in the anatomy map.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from recoup.errors import RecoupError

# transformers 5 renamed the KV cache argument and output field from ``past_key_values`` to ``cache``
CACHE_ARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def output_cache(out):
    """The KV cache a forward returned, under this transformers version's name (no deprecation warning)."""
    return getattr(out, CACHE_ARG)


def keeps_logits(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes ``logits_to_keep`` (the LM head only at chosen positions)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def build_inputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    prefix: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Model kwargs (``inputs_embeds``, ``attention_mask``, ``position_ids``) with ``prefix`` prepended.

    input_ids: (B, T) long; attention_mask: (B, T) of 0/1; prefix: (P, H) or (B, P, H).
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    embeds = model.get_input_embeddings()(input_ids)
    if prefix is not None:
        if prefix.dim() == 2:
            prefix = prefix.unsqueeze(0).expand(input_ids.shape[0], -1, -1)
        if prefix.shape[-1] != embeds.shape[-1]:
            raise RecoupError(
                f"the recovery's hidden size {prefix.shape[-1]} does not match the model's "
                f"{embeds.shape[-1]}; a prompt attaches only to models of the same hidden size"
            )
        embeds = torch.cat([prefix.to(embeds.dtype), embeds], dim=1)
        attention_mask = torch.cat([attention_mask.new_ones(prefix.shape[:2]), attention_mask], dim=1)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return {"inputs_embeds": embeds, "attention_mask": attention_mask, "position_ids": position_ids}


def forward_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    prefix: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits (B, T, V) at the input positions (the prefix positions are dropped)."""
    if prefix is None:
        if attention_mask is None:
            return model(input_ids=input_ids, use_cache=False).logits
        kwargs = build_inputs(model, input_ids, attention_mask)
    else:
        kwargs = build_inputs(model, input_ids, attention_mask, prefix)
    logits = model(**kwargs, use_cache=False).logits
    return logits[:, logits.shape[1] - input_ids.shape[1] :]
