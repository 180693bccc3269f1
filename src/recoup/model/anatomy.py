"""Per-architecture anatomy as data: where the decoder layers, their linears, embeddings,
final norm and lm_head live, keyed by ``config.model_type`` (docs/design.md, house style 4).

``sequential`` lists the linear sub-groups of one decoder layer in true-sequential order
(GPTQ's ``--true-sequential``): linears in one sub-group read the same input, so they share one
set of calibration statistics; attention comes before the MLP.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import torch
from torch import nn

from recoup.errors import RecoupError


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    layers: str
    embed: str
    final_norm: str
    lm_head: str
    sequential: tuple[tuple[str, ...], ...]
    attention: tuple[str, ...]
    mlp: tuple[str, ...]
    pos_embed: str | None = None
    conv1d: bool = False  # GPT-2 style Conv1D linears store weight as (in, out)


_LLAMA = ArchSpec(
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma3_text": _LLAMA,
    "opt": ArchSpec(
        layers="model.decoder.layers",
        embed="model.decoder.embed_tokens",
        final_norm="model.decoder.final_layer_norm",
        lm_head="lm_head",
        pos_embed="model.decoder.embed_positions",
        sequential=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
        attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
        mlp=("fc1", "fc2"),
    ),
    "gpt2": ArchSpec(
        layers="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        pos_embed="transformer.wpe",
        sequential=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        attention=("attn.c_attn", "attn.c_proj"),
        mlp=("mlp.c_fc", "mlp.c_proj"),
        conv1d=True,
    ),
}


def _get(root: nn.Module, dotted: str) -> nn.Module:
    mod = root
    for part in dotted.split("."):
        mod = getattr(mod, part)
    return mod


@dataclasses.dataclass
class Anatomy:
    """The located parts of one model."""

    model: nn.Module
    model_type: str
    spec: ArchSpec

    @property
    def layers(self) -> nn.ModuleList:
        return _get(self.model, self.spec.layers)

    @property
    def embed(self) -> nn.Embedding:
        return _get(self.model, self.spec.embed)

    @property
    def final_norm(self) -> nn.Module:
        return _get(self.model, self.spec.final_norm)

    @property
    def lm_head(self) -> nn.Module:
        return _get(self.model, self.spec.lm_head)

    @property
    def pos_embed(self) -> nn.Module | None:
        return _get(self.model, self.spec.pos_embed) if self.spec.pos_embed else None

    @property
    def hidden_size(self) -> int:
        return self.embed.weight.shape[1]

    def linear_names(self) -> tuple[str, ...]:
        """Names (relative to a decoder layer) of every targeted linear, in sequential order."""
        return tuple(n for group in self.spec.sequential for n in group)

    def linears(self, layer: nn.Module) -> dict[str, nn.Module]:
        return {name: _get(layer, name) for name in self.linear_names()}

    def iter_linears(self) -> Iterator[tuple[str, nn.Module]]:
        """(full dotted name from the model root, module) for every targeted linear."""
        for i, layer in enumerate(self.layers):
            for name, mod in self.linears(layer).items():
                yield f"{self.spec.layers}.{i}.{name}", mod

    def weight_matrix(self, module: nn.Module) -> torch.Tensor:
        """The weight as (out_features, in_features), whatever the module's storage layout."""
        return module.weight.t() if self.spec.conv1d else module.weight

    def peft_target_modules(self, which: str = "all") -> list[str]:
        """Leaf names for PEFT's ``target_modules`` (attention, mlp or all)."""
        names = {"attention": self.spec.attention, "mlp": self.spec.mlp, "all": self.spec.attention + self.spec.mlp}[
            which
        ]
        return sorted({n.split(".")[-1] for n in names})


def anatomy(model: nn.Module) -> Anatomy:
    """Locate the parts of ``model`` from its ``config.model_type``; unknown types get a clear error."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = ARCHITECTURES.get(model_type or "")
    if spec is None:
        raise RecoupError(f"unsupported architecture '{model_type}'; supported: {', '.join(sorted(ARCHITECTURES))}")
    try:
        found = Anatomy(model=model, model_type=model_type, spec=spec)
        found.linears(found.layers[0])
    except AttributeError as exc:
        raise RecoupError(f"model of type '{model_type}' does not have the expected layout ({exc})") from None
    return found
