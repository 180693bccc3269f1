"""``--format hf``: a plain Hugging Face checkpoint (dense safetensors in the chosen dtype + tokenizer) that
``transformers.AutoModelForCausalLM.from_pretrained`` and every HF-compatible server load.

The weights are the artifact's decoded weights: pruned zeros stay exact zeros in any dtype; grid values
``scale * (q - zero)`` are exact in float32 and rounded once to float16 / bfloat16 when asked. The
``config.json`` carries nothing recoup-specific; the compression record goes in ``recoup_export.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from recoup.artifact.export.base import ArtifactInfo, ExportConfig, dtype_of


class HfExporter:
    name = "hf"
    loader = "transformers AutoModelForCausalLM.from_pretrained (and vLLM, SGLang, TGI as a dense model)"

    def plan(self, info: ArtifactInfo, config: ExportConfig) -> dict[str, Any]:
        return {"dtype": str(dtype_of(info, config)).replace("torch.", ""), "quantized_linears": 0}

    def write(
        self,
        model: nn.Module,
        tokenizer: Any,
        info: ArtifactInfo,
        plan: dict[str, Any],
        config: ExportConfig,
        out: Path,
    ) -> dict[str, Any]:
        """Dense safetensors of ``model`` in ``plan['dtype']`` and its tokenizer, into ``out``."""
        model = model.to(dtype_of(info, config))
        model.config.dtype = plan["dtype"]
        model.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
        return {"files": ["model.safetensors", "config.json"]}
