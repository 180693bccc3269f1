"""``--format compressed-tensors``: what llm-compressor writes and vLLM, SGLang and transformers (with the
``compressed-tensors`` package) load.

The artifact's integer codes and scales are mapped directly (no re-quantization): a code ``q`` in
``[0, 2**bits)`` with zero point ``z`` is stored signed, ``q - 2**(bits-1)``, and the zero point as
``z - 2**(bits-1)`` (only when asymmetric), so the destination's ``scale * (q_s - z_s)`` is recoup's
``scale * (q - z)`` bit for bit in float32. Layouts (compressed-tensors 0.20):

- ``pack-quantized`` (1-7 bits): ``X.weight_packed`` int32 (rows, ceil(cols * bits / 32)), element i at
  bit ``i * bits`` of the row's bit stream (crossing words); ``X.weight_scale`` (rows, groups);
  ``X.weight_shape`` int64 [rows, cols]; ``X.weight_zero_point`` packed the same way along the rows.
- ``int-quantized`` (8 bits): ``X.weight`` int8, ``X.weight_scale``, ``X.weight_zero_point`` int8 if asymmetric.

Sparse storage formats are gone from compressed-tensors and vLLM refuses a ``sparsity_config`` with
targets: pruned zeros are written as the code of zero (a grid point) and ``sparsity_config`` is empty.
Linears the artifact did not quantize (``lm_head``, AWQ's rescaled preceding linears, ``--targets``
outside) are dense and listed in ``ignore``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recoup.artifact.export.base import (
    ArtifactInfo,
    ExportConfig,
    LinearCodes,
    dtype_of,
    linear_codes,
    linear_modules,
    natural_groups,
)
from recoup.errors import RecoupError

FORMAT_VERSION = "0.20.1"  # the compressed-tensors release whose layout this writes (and tests load)


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack (rows, cols) unsigned ``values`` < 2**bits into int32 (rows, ceil(cols * bits / 32)): the
    row's values as one bit stream, value i at bit ``i * bits`` (compressed-tensors' ``pack_to_int32``)."""
    rows, cols = values.shape
    words = math.ceil(cols * bits / 32)
    v = values.to(torch.int64)
    stream = ((v[:, :, None] >> torch.arange(bits)) & 1).reshape(rows, cols * bits)
    stream = torch.nn.functional.pad(stream, (0, words * 32 - cols * bits)).view(rows, words, 32)
    packed = (stream << torch.arange(32)).sum(-1)  # int64 in [0, 2**32)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


class CompressedTensorsExporter:
    name = "compressed-tensors"
    loader = "vLLM, SGLang, transformers + compressed-tensors (pip install 'recoup[export]')"

    def plan(self, info: ArtifactInfo, config: ExportConfig) -> dict[str, Any]:
        if not info.bits:
            raise RecoupError(
                f"'{info.path}' is not quantized ({info.describe_grid()}); compressed-tensors holds "
                "quantized weights only (its sparse formats were removed): use --format hf"
            )
        if not 1 <= info.bits <= 8:
            raise RecoupError(
                f"compressed-tensors holds 1-8 bit integers, the artifact has {info.bits}-bit codes; use --format hf"
            )
        why = natural_groups(info)
        if why:
            raise RecoupError(f"compressed-tensors cannot hold this grid exactly: {why} (or use --format hf)")
        fmt = "int-quantized" if info.bits == 8 else "pack-quantized"
        return {"format": fmt, "dtype": str(dtype_of(info, config)).replace("torch.", "")}

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
        """The quantized linears as packed codes + scales, the rest dense in ``plan['dtype']``, into ``out``."""
        from safetensors.torch import save_file

        dtype = dtype_of(info, config)
        bits, offset = int(info.bits), 2 ** (int(info.bits) - 1)
        linears = linear_modules(model)
        tensors: dict[str, torch.Tensor] = {}
        quantized: list[str] = []
        for name, q in info.qparams.items():
            lc = linear_codes(linears[name].weight, q, bits) if name in linears else None
            if lc is None:
                continue
            tensors.update(_module_tensors(name, lc, bits, offset, plan["format"], info.sym, dtype))
            quantized.append(name)
        done = {f"{n}.weight" for n in quantized}
        state = model.state_dict()
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        for key, t in state.items():
            if key not in done:
                tensors[key] = (t.to(dtype) if t.is_floating_point() else t).contiguous().cpu()
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        model.config.dtype = plan["dtype"]
        model.config.save_pretrained(str(out))
        cfg_file = out / "config.json"
        raw = json.loads(cfg_file.read_text())
        raw["quantization_config"] = _quantization_config(info, plan["format"], sorted(set(linears) - set(quantized)))
        cfg_file.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        return {
            "quantized_linears": len(quantized),
            "ignored_linears": len(linears) - len(quantized),
            "files": ["model.safetensors", "config.json"],
        }


def _module_tensors(
    name: str, lc: LinearCodes, bits: int, offset: int, fmt: str, sym: bool, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    rows, cols = lc.codes.shape
    scale = lc.scale.to(dtype).contiguous()
    zero_signed = (lc.zero - offset).to(torch.int64)
    if fmt == "int-quantized":
        out = {f"{name}.weight": (lc.codes.to(torch.int16) - offset).to(torch.int8), f"{name}.weight_scale": scale}
        if not sym:
            out[f"{name}.weight_zero_point"] = zero_signed.to(torch.int8).contiguous()
        return out
    out = {
        f"{name}.weight_packed": pack_int32(lc.codes, bits),
        f"{name}.weight_scale": scale,
        f"{name}.weight_shape": torch.tensor([rows, cols], dtype=torch.int64),
    }
    if not sym:  # packed along the output dimension (packed_dim=0)
        out[f"{name}.weight_zero_point"] = pack_int32((zero_signed + offset).t(), bits).t().contiguous()
    return out


def _quantization_config(info: ArtifactInfo, fmt: str, ignore: list[str]) -> dict[str, Any]:
    weights = {
        "num_bits": int(info.bits),
        "type": "int",
        "symmetric": info.sym,
        "strategy": "group" if info.group_size else "channel",
        "group_size": info.group_size,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "block_structure": None,
    }
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": fmt,
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "global_compression_ratio": None,
        "version": FORMAT_VERSION,
    }
