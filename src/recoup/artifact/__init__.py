"""The artifact room: a compressed model on disk and the one loader of every model source.

- :mod:`recoup.artifact.grid`: the quantization grid (bits, groups, symmetric/asymmetric);
- :mod:`recoup.artifact.report`: what a compression records per linear (:class:`CompressReport`);
- :mod:`recoup.artifact.packing`: bit-packed codes and sparsity bitmasks;
- :mod:`recoup.artifact.store`: save / load / verify an artifact, its manifest and fingerprint;
- :func:`load_model`: any source (bundled alias, ``.gguf``, HF directory, hub id, recoup artifact).

It sits above ``model/`` and ``data/`` and below ``compress/``, ``recover/`` and ``evaluate/``.
"""

from __future__ import annotations

import torch

from recoup.model.load import LoadedModel, load_pretrained, parse_dtype, resolve_source


def load_model(source: str, dtype: str | torch.dtype = "float32", device: str = "cpu",
               trust_remote_code: bool = False) -> LoadedModel:
    """Load any supported source (a recoup artifact included) as a causal LM in eval mode on ``device``."""
    kind, path = resolve_source(source)
    if kind == "artifact":
        from recoup.artifact.store import load_artifact

        return load_artifact(path, dtype=parse_dtype(dtype), device=device)
    return load_pretrained(source, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


__all__ = ["LoadedModel", "load_model"]
