"""What a compression run did, per targeted linear and in total (serialized into ``recoup.json``)."""

from __future__ import annotations

import dataclasses
import resource
import sys
from typing import Any

import torch


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    Linux: the high-water mark of this process's own memory (``VmHWM``). Not ``ru_maxrss``: a process started
    by fork and exec starts its ``ru_maxrss`` at its parent's peak, so a compression launched from a large
    parent (a notebook, a benchmark driver) would report the parent's peak as its own. Elsewhere ``ru_maxrss``
    (KiB on Linux and BSD, bytes on macOS)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def rss_mb() -> float | None:
    """Resident memory of this process now, in MiB (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * resource.getpagesize() / 2**20


@dataclasses.dataclass
class LinearRecord:
    name: str  # dotted name from the model root, e.g. model.layers.3.mlp.down_proj
    layer: int
    shape: tuple[int, int]  # (out_features, in_features)
    sparsity: float  # fraction of exact zeros after compression
    bits: int | None
    group_size: int | None
    error: float  # relative reconstruction error, see error_kind
    error_kind: str  # output (H-weighted) | act_norm (diag-weighted) | sample (on calibration rows) | weight
    seconds: float
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        return d


@dataclasses.dataclass
class CompressReport:
    """Per-linear records plus totals; ``qparams`` holds each quantized linear's grid (scale, zero,
    g_idx tensors) for the artifact and for :func:`recoup.artifact.fingerprint.compression_fingerprint`."""

    method: str
    config: dict[str, Any]
    model_type: str
    calibration: dict[str, Any] | None
    linears: list[LinearRecord]
    seconds: float
    peak_rss_mb: float
    qparams: dict[str, dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all targeted linears (weighted by size)."""
        total = sum(r.shape[0] * r.shape[1] for r in self.linears)
        zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.linears)
        return zeros / total if total else 0.0

    @property
    def mean_error(self) -> float:
        return sum(r.error for r in self.linears) / len(self.linears) if self.linears else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "config": self.config,
            "model_type": self.model_type,
            "calibration": self.calibration,
            "seconds": self.seconds,
            "peak_rss_mb": self.peak_rss_mb,
            "sparsity": self.sparsity,
            "mean_error": self.mean_error,
            "linears": [r.to_dict() for r in self.linears],
        }
