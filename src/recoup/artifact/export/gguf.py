"""``--format gguf``: one ``model.gguf`` that llama.cpp and Ollama run (and transformers reads with ``gguf_file=``).

Quantized linears are written in the GGUF block type their grid IS, from the artifact's integer codes
(no re-quantization). A GGUF block is 32 consecutive weights of a row with one fp16 scale ``d``:

- Q4_0: codes q in 0..15, value ``d * (q - 8)``: recoup's symmetric 4-bit grid ``scale * (q - 8)``;
- Q4_1: value ``d * q + m`` (fp16 ``m``): recoup's asymmetric 4-bit grid with ``m = -scale * zero``;
- Q8_0: int8 q, value ``d * q``: recoup's symmetric 8-bit grid (zero 128) with ``q - 128``.

A group of ``k * 32`` columns repeats its scale over its ``k`` blocks. The file is exact up to the fp16
storage of ``d`` (and ``m``); a grid fitted with ``QuantGrid(scale_dtype="float16")`` makes Q4_0 / Q8_0
exact. Norms and biases are F32; embeddings, ``lm_head`` and unquantized linears take the float type
of ``--dtype`` (F32 / F16 / BF16). Architecture metadata and tensor names follow llama.cpp's
``convert_hf_to_gguf.py`` (LLaMA's q/k rows are permuted to its rotary layout).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from recoup.artifact.export.base import ArtifactInfo, ExportConfig, LinearCodes, dtype_of, linear_codes
from recoup.artifact.export.gguf_vocab import add_tokenizer, check_tokenizer
from recoup.errors import RecoupError

log = logging.getLogger(__name__)
FILE = "model.gguf"
BLOCK = 32


@dataclasses.dataclass(frozen=True)
class GgufArch:
    """How one transformers model type is written: llama.cpp's architecture, and whether q/k rows are permuted."""

    arch: str
    permute_qk: bool
    name_hint: str = ""  # transformers reads llama-arch files named "...mistral..." back as mistral


# model types llama.cpp runs and this writer handles (data, docs/design.md house style 4)
ARCHES = {
    "llama": GgufArch("llama", True),
    "mistral": GgufArch("llama", True, "mistral"),
    "qwen2": GgufArch("qwen2", False),
    "qwen3": GgufArch("qwen3", False),
}
REFUSED = {
    "gemma3_text": "its norms (1 + w) and scaled embeddings are not converted yet",
    "opt": "llama.cpp has no OPT architecture",
    "gpt2": "its fused Conv1D attention is not converted yet",
}
# (bits, sym) -> the block type that holds that grid
GRID_TYPES = {(4, True): "Q4_0", (4, False): "Q4_1", (8, True): "Q8_0"}
FLOAT_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "BF16": 32}


def _block_mismatch(info: ArtifactInfo) -> str | None:
    """None when every quantized linear's grid has one scale per aligned 32-column block; else why not."""
    for name, q in info.qparams.items():
        g = q["g_idx"].long()
        if g.numel() % BLOCK:
            return f"'{name}' has {g.numel()} columns, not a multiple of {BLOCK}"
        blocks = g.view(-1, BLOCK)
        if not torch.equal(blocks, blocks[:, :1].expand_as(blocks)):
            return f"'{name}' has groups that do not cover whole 32-column blocks"
    return None


def _grid_flags(qtype: str) -> str:
    bits = {"Q4_0": "--bits 4 --sym", "Q4_1": "--bits 4 --asym", "Q8_0": "--bits 8 --sym"}[qtype]
    return f"{bits} --group-size 32|64|128 (any multiple of 32) without --act-order"


class GgufExporter:
    name = "gguf"
    loader = "llama.cpp, Ollama (and transformers with gguf_file=)"

    def plan(self, info: ArtifactInfo, config: ExportConfig) -> dict[str, Any]:
        if info.model_type in REFUSED:
            raise RecoupError(
                f"GGUF export of a '{info.model_type}' model: {REFUSED[info.model_type]}; "
                "use --format hf or compressed-tensors"
            )
        if info.model_type not in ARCHES:
            raise RecoupError(
                f"GGUF export knows {', '.join(sorted(ARCHES))} models, not '{info.model_type}'; "
                "use --format hf or compressed-tensors"
            )
        from transformers import AutoConfig, AutoTokenizer

        from recoup.artifact.store import artifact_config  # a packed artifact's config, its model type restored

        cfg = artifact_config(info.path) or AutoConfig.from_pretrained(str(info.path))
        check_config(cfg, ARCHES[info.model_type])
        # the tokenizer as recoup loads the artifact's (its model type restored): the class transformers picks for
        # that type may split text differently from the bare tokenizer.json (see check_tokenizer)
        pre, pre_from = check_tokenizer(info.path, AutoTokenizer.from_pretrained(str(info.path), config=cfg))
        float_type = FLOAT_TYPES[dtype_of(info, config)]
        grid_type = GRID_TYPES.get((info.bits, info.sym)) if info.bits else None
        why = _block_mismatch(info) if grid_type else None
        fits = grid_type if grid_type and not why else None
        wanted = config.gguf_type
        if wanted is None:
            linear_type = fits or float_type
            if info.bits and not fits:
                log.warning(
                    "the artifact's grid (%s) has no GGUF block type (%s); its quantized linears are written as %s",
                    info.describe_grid(),
                    why or "no block type",
                    linear_type,
                )
        elif wanted in FLOAT_TYPES.values():
            linear_type = float_type = wanted
        elif wanted != fits:
            reason = why if wanted == grid_type else f"the artifact has {info.describe_grid()}, not {wanted}'s grid"
            raise RecoupError(
                f"--gguf-type {wanted} does not hold this artifact exactly ({reason}); recompress with "
                f"{_grid_flags(wanted)}, or pick --gguf-type {float_type}"
            )
        else:
            linear_type = wanted
        return {
            "linear_type": linear_type,
            "float_type": float_type,
            "pre_tokenizer": pre,
            "pre_tokenizer_from": pre_from,
            "arch": ARCHES[info.model_type].arch,
        }

    @torch.no_grad()
    def write(
        self,
        model: nn.Module,
        tokenizer: Any,
        info: ArtifactInfo,
        plan: dict[str, Any],
        config: ExportConfig,
        out: Path,
    ) -> dict[str, Any]:
        """``out/model.gguf``: metadata, tokenizer, then every tensor under llama.cpp's name."""
        import gguf

        spec = ARCHES[info.model_type]
        cfg = model.config
        writer = gguf.GGUFWriter(str(out / FILE), spec.arch)
        _add_metadata(writer, cfg, spec, FILE_TYPES[plan["linear_type"]])
        add_tokenizer(writer, tokenizer, info.path, int(cfg.vocab_size), plan["pre_tokenizer"])
        names = gguf.get_tensor_name_map(
            next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == spec.arch), int(cfg.num_hidden_layers)
        )
        qtype = plan["linear_type"] if plan["linear_type"] in GRID_TYPES.values() else None
        counts: dict[str, int] = {}
        exact_scales = True
        state = model.state_dict()
        if getattr(cfg, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        modules = dict(model.named_modules())
        for key, t in state.items():
            module, suffix = key.rsplit(".", 1)
            gname = names.get_name(module)
            if gname is None:
                raise RecoupError(f"GGUF export: no llama.cpp name for '{key}'")
            perm = _qk_permutation(module, cfg, t.shape[0]) if spec.permute_qk else None
            q = info.qparams.get(module) if suffix == "weight" else None
            lc = linear_codes(t, q, int(info.bits)) if qtype and q is not None else None
            if lc is not None and isinstance(modules.get(module), nn.Linear):
                if perm is not None:
                    lc = LinearCodes(lc.codes[perm], lc.scale[perm], lc.zero[perm])
                data, raw = _blocks(lc, q["g_idx"], qtype), getattr(gguf.GGMLQuantizationType, qtype)
                exact_scales &= bool(torch.equal(lc.scale.half().float(), lc.scale))
                typ = qtype
            else:
                w = t[perm] if perm is not None else t
                typ = "F32" if t.dim() == 1 else plan["float_type"]
                data, raw = _float_data(w, typ)
            writer.add_tensor(f"{gname}.{suffix}", data, raw_dtype=raw)
            counts[typ] = counts.get(typ, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        return {
            "file": FILE,
            "tensor_types": counts,
            "scales_exact_in_fp16": exact_scales if qtype else None,
            "files": [FILE],
        }


def _add_metadata(writer: Any, cfg: Any, spec: GgufArch, file_type: int) -> None:
    check_config(cfg, spec)
    heads, kv = int(cfg.num_attention_heads), int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    rope = _rope(cfg)
    writer.add_name(f"{spec.name_hint} {getattr(cfg, '_name_or_path', '') or 'recoup export'}".strip())
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(int(cfg.hidden_size))
    writer.add_block_count(int(cfg.num_hidden_layers))
    writer.add_feed_forward_length(int(cfg.intermediate_size))
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    if head_dim != cfg.hidden_size // heads or spec.arch == "qwen3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(int(cfg.vocab_size))
    writer.add_file_type(file_type)
    writer.add_quantization_version(2)


def _rope(cfg: Any) -> dict[str, Any]:
    return dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})


def check_config(cfg: Any, spec: GgufArch) -> None:
    """RecoupError (one line) for what llama.cpp's ``spec.arch`` graph would run differently from transformers,
    or would refuse to load: rope scaling (not written), sliding-window attention (not written), a qwen3
    ``o_proj`` bias (llama.cpp's qwen3 has no tensor for it, and an unused tensor fails its load), and
    rotary dimensions llama.cpp checks (head_dim even, n_rot == head_dim)."""
    rope = _rope(cfg)
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise RecoupError(f"GGUF export: rope scaling '{rope.get('rope_type')}' is not written yet; use --format hf")
    window = getattr(cfg, "sliding_window", None)
    if window is not None and getattr(cfg, "use_sliding_window", True) and window < int(cfg.max_position_embeddings):
        raise RecoupError(f"GGUF export: sliding-window attention ({window} tokens) is not written; use --format hf")
    if spec.arch == "qwen3" and getattr(cfg, "attention_bias", False):
        raise RecoupError(
            "GGUF export: llama.cpp's qwen3 has no attention output bias (attention_bias=true); "
            "use --format hf or compressed-tensors"
        )
    if float(getattr(cfg, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise RecoupError("GGUF export: partial rotary embeddings are not written; use --format hf")
    heads = int(cfg.num_attention_heads)
    if int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads) % 2:
        raise RecoupError("GGUF export: an odd head_dim has no rotary layout in llama.cpp; use --format hf")


def _qk_permutation(module: str, cfg: Any, rows: int) -> torch.Tensor | None:
    """llama.cpp's row order for LLaMA's q_proj / k_proj (``convert_hf_to_gguf.LlamaModel.permute``):
    within each head, the two rotary halves interleaved."""
    leaf = module.rsplit(".", 1)[-1]
    if leaf not in ("q_proj", "k_proj"):
        return None
    heads = int(
        cfg.num_attention_heads
        if leaf == "q_proj"
        else (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    )
    return torch.arange(rows).view(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def _blocks(lc: LinearCodes, g_idx: torch.Tensor, qtype: str) -> np.ndarray:
    """(rows, blocks * block bytes) uint8 of ``lc`` in ``qtype``'s block layout (ggml-common.h)."""
    rows, cols = lc.codes.shape
    nb = cols // BLOCK
    g = g_idx.long().view(nb, BLOCK)[:, 0]
    d = lc.scale[:, g].half().reshape(-1, 1).view(torch.uint8)  # (rows * nb, 2)
    codes = lc.codes.reshape(rows * nb, BLOCK)
    if qtype == "Q8_0":
        zero = lc.zero[:, g].reshape(-1, 1)
        q = (codes.to(torch.int16) - zero.to(torch.int16)).to(torch.int8).view(torch.uint8)
        parts = [d, q]
    else:
        qs = codes[:, : BLOCK // 2] | (codes[:, BLOCK // 2 :] << 4)
        if qtype == "Q4_0":
            parts = [d, qs]
        else:  # Q4_1: d * q + m with m = -scale * zero
            m = (-lc.scale[:, g] * lc.zero[:, g]).half().reshape(-1, 1).view(torch.uint8)
            parts = [d, m, qs]
    return torch.cat(parts, 1).reshape(rows, -1).numpy()


def _float_data(t: torch.Tensor, typ: str) -> tuple[np.ndarray, Any]:
    import gguf

    t = t.detach().cpu()
    if typ == "F32":
        return t.float().numpy(), None
    if typ == "F16":
        return t.half().numpy(), None
    b = t.to(torch.bfloat16).contiguous().view(torch.uint8)  # (…, 2 * cols) little-endian bf16 bytes
    return b.numpy(), gguf.GGMLQuantizationType.BF16
