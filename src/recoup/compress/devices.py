"""Where the compression engine runs: the execution device a user names, and moving what runs before the first
decoder layer (embeddings, rotary embeddings) there and back for the offload mode of :mod:`recoup.compress.engine`."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from recoup.errors import RecoupError
from recoup.model.anatomy import Anatomy


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor inside (tuples, lists, dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def resolve_device(device: str | torch.device | None, model_device: torch.device) -> torch.device:
    """The execution device: None -> the model's; "auto" -> cuda when available, else cpu; "cuda" -> cuda:current."""
    if device is None:
        return model_device
    if isinstance(device, str) and device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise RecoupError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RecoupError(f"device '{device}' asked for but CUDA is not available; use --device cpu or auto")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise RecoupError(f"device '{device}' asked for but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type != "cpu":
        raise RecoupError(f"unsupported device '{device}'; use auto, cpu, cuda or cuda:N")
    return dev


@contextlib.contextmanager
def prefix_on(model: nn.Module, anat: Anatomy, device: torch.device) -> Iterator[None]:
    """Move every parameter and buffer outside the decoder layers, the final norm and lm_head (embeddings,
    positional / rotary embeddings: what runs before the first layer) to ``device``; move them back on exit.
    A tied weight (embedding = lm_head) moves once, as the one tensor it is."""
    skip = (anat.spec.layers, anat.spec.final_norm, anat.spec.lm_head)
    params: dict[int, tuple[nn.Parameter, torch.device]] = {}
    buffers: list[tuple[nn.Module, str, torch.device]] = []
    try:
        for name, mod in model.named_modules():
            if any(name == k or name.startswith(k + ".") for k in skip):
                continue
            for p in mod.parameters(recurse=False):
                if id(p) not in params:
                    params[id(p)] = (p, p.device)
                    p.data = p.data.to(device)
            for bname, b in list(mod._buffers.items()):
                if b is not None:
                    buffers.append((mod, bname, b.device))
                    mod._buffers[bname] = b.to(device)
        yield
    finally:
        for p, dev in params.values():
            p.data = p.data.to(dev)
        for mod, bname, dev in buffers:
            mod._buffers[bname] = mod._buffers[bname].to(dev)
