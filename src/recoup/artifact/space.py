"""Disk space of an artifact: refuse an output that cannot fit before compressing, and turn a full disk while
writing into one line."""

from __future__ import annotations

import errno
import shutil
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from recoup.errors import RecoupError


def estimate_bytes(model: nn.Module, bits: int | None, sparsity: float | None, storage: str) -> int:
    """A lower bound of the artifact's size on disk: every tensor but the linears at its own size, the linears
    (the head excepted) as ``packed`` stores them at best (kept share x bits, or x their dtype's bits).
    Used to refuse an output that cannot fit before any compression runs; being a lower bound, it never
    refuses one that would fit."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear) and m is not head}
    total, seen = 0, set()
    for p in list(model.parameters()) + list(model.buffers()):
        if id(p) in seen:
            continue
        seen.add(id(p))
        full = p.numel() * p.element_size()
        if id(p) in linears and storage == "packed" and (bits or sparsity):
            kept = 1.0 - (sparsity or 0.0)
            full = int(p.numel() * kept * (bits if bits else p.element_size() * 8) / 8)
        total += full
    return total


def check_space(out_dir: str | Path, need: int) -> None:
    """RecoupError in one line when the file system of ``out_dir`` has less than ``need`` bytes free."""
    out = Path(out_dir).expanduser().resolve()
    probe = next((p for p in (out, *out.parents) if p.exists()), None)
    if probe is None:
        return
    free = shutil.disk_usage(probe).free
    if free < need:
        raise RecoupError(
            f"'{out}' cannot fit the artifact: it needs at least {need / 1e6:.0f} MB and "
            f"{free / 1e6:.0f} MB are free there; free some space or choose another --out"
        )


@contextmanager
def no_space_as_error(out_dir: str | Path):
    """A full disk while writing ``out_dir`` (OSError ENOSPC, or safetensors' own error carrying it) becomes one
    RecoupError line; the writers remove their partial folders on the way out."""
    try:
        yield
    except Exception as exc:
        if getattr(exc, "errno", None) == errno.ENOSPC or "No space left on device" in str(exc):
            raise RecoupError(
                f"no space left on the device while writing '{Path(out_dir).expanduser()}' (the "
                f"partial folder is removed); free some space or choose another --out"
            ) from None
        raise
