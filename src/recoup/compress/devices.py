"""Where the compression engine runs: the execution device a user names (the layer streamer,
:mod:`recoup.model.streamer`, moves the layers there)."""

from __future__ import annotations

import torch

from recoup.errors import RecoupError


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
