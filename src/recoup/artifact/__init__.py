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

from recoup.model.load import LoadedModel, load_pretrained, resolve_dtype, resolve_source


def load_model(
    source: str,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    device_map: str | None = None,
) -> LoadedModel:
    """Load any supported source (a recoup artifact included) as a causal LM in eval mode on ``device``.

    ``dtype="auto"``: the checkpoint's dtype on CUDA, float32 on CPU. ``device_map="auto"``: accelerate's
    big-model placement over the GPUs and CPU memory, for a model that does not fit one device (an artifact
    is unpacked on CPU first, then dispatched)."""
    kind, path = resolve_source(source)
    if kind == "artifact":
        from recoup.artifact.store import load_artifact

        loaded = load_artifact(
            path,
            dtype=resolve_dtype(dtype, "auto" if device_map else device, path),
            device="cpu" if device_map else device,
        )
        if device_map is not None:
            from accelerate import dispatch_model, infer_auto_device_map

            model = loaded.model
            placement = infer_auto_device_map(model, no_split_module_classes=model._no_split_modules or [])
            loaded.model = dispatch_model(model, device_map=placement) if set(placement.values()) != {"cpu"} else model
        return loaded
    return load_pretrained(
        source, dtype=dtype, device=device, trust_remote_code=trust_remote_code, device_map=device_map
    )


__all__ = ["LoadedModel", "load_model"]
