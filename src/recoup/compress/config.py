"""The typed, validated compression config (house style 1).

One config covers every method; ``CompressConfig.from_dict`` rejects unknown keys with a
did-you-mean, and ``__post_init__`` rejects combinations a method cannot honour (2:4 at 30%
sparsity, 3.5 bits, act-order outside GPTQ ...) with one clear line.

N:M follows the NVIDIA convention: N weights are *kept* in every group of M consecutive input
columns of a row (2:4 keeps 2 of 4, i.e. 50% sparsity).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from recoup.config import Config, check
from recoup.errors import RecoupError
from recoup.registry import unknown_name_message

SPARSE_METHODS = ("magnitude", "wanda", "sparsegpt")
QUANT_METHODS = ("rtn", "gptq", "awq")
METHOD_NAMES = SPARSE_METHODS + QUANT_METHODS
TARGETS = ("all", "attention", "mlp")


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"2:4"`` -> (2, 4) with 1 <= N < M; anything else raises RecoupError."""
    try:
        n_str, m_str = pattern.split(":")
        n, m = int(n_str), int(m_str)
    except (ValueError, AttributeError):
        raise RecoupError(f"pattern '{pattern}' is not of the form N:M (e.g. 2:4 keeps 2 of every 4 weights)") from None
    check(1 <= n < m <= 64, f"pattern {pattern}: need 1 <= N < M <= 64 (N kept of every M weights)")
    return n, m


@dataclasses.dataclass
class CompressConfig(Config):
    """What to compress and how; papers' defaults (SparseGPT/GPTQ: blocksize 128, percdamp 0.01)."""

    method: str = "sparsegpt"
    sparsity: float | None = None  # fraction of weights set to zero in each targeted linear (0-0.99)
    pattern: str | None = None  # "N:M" semi-structured sparsity (N kept of every M)
    bits: int | None = None  # quantization bits (2-8); with sparsegpt: joint sparse + quantized pass
    group_size: int | None = None  # columns per quantization group; None = one group per row
    sym: bool = True  # symmetric grid (zero point in the middle) or asymmetric (min/max)
    blocksize: int = 128  # OBS block of columns (SparseGPT/GPTQ)
    percdamp: float = 0.01  # dampening, fraction of the mean Hessian diagonal
    act_order: bool = False  # GPTQ: quantize columns in order of decreasing Hessian diagonal
    static_groups: bool = False  # GPTQ + act_order: fix group grids before reordering
    targets: str = "all"  # all | attention | mlp
    awq_grid: int = 20  # AWQ: number of scale exponents tried in [0, 1)
    awq_samples: int = 4096  # AWQ: calibration tokens kept per group for the scale search
    batch_size: int = 8  # calibration windows per forward in the engine

    def __post_init__(self) -> None:
        if self.method not in METHOD_NAMES:
            raise RecoupError(unknown_name_message("method", str(self.method), METHOD_NAMES))
        if self.sparsity is not None:
            check(isinstance(self.sparsity, (int, float)) and not isinstance(self.sparsity, bool),
                  f"sparsity must be a number in [0, 0.99] (got {self.sparsity!r})")
            self.sparsity = float(self.sparsity)
            check(0.0 <= self.sparsity <= 0.99, f"sparsity must be in [0, 0.99] (got {self.sparsity})")
        if self.pattern is not None:
            n, m = parse_pattern(self.pattern)
            implied = 1.0 - n / m
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-6:
                raise RecoupError(f"pattern {self.pattern} means {implied:.0%} sparsity but sparsity={self.sparsity} "
                                  f"was given; drop the sparsity or set it to {implied:g}")
            self.sparsity = implied
        if self.bits is not None:
            check(isinstance(self.bits, int) and not isinstance(self.bits, bool) and 2 <= self.bits <= 8,
                  f"bits must be a whole number from 2 to 8 (got {self.bits!r})")
        if self.group_size is not None:
            check(isinstance(self.group_size, int) and not isinstance(self.group_size, bool),
                  f"group_size must be a whole number (got {self.group_size!r})")
            if self.group_size in (0, -1):
                self.group_size = None  # GPTQ convention: -1 = per row
            else:
                check(self.group_size >= 2, f"group_size must be >= 2, or -1 for one group per row (got {self.group_size})")
        check(isinstance(self.blocksize, int) and self.blocksize >= 1, f"blocksize must be >= 1 (got {self.blocksize})")
        check(0.0 < float(self.percdamp) <= 1.0, f"percdamp must be in (0, 1] (got {self.percdamp})")
        check(self.targets in TARGETS, unknown_name_message("targets", str(self.targets), TARGETS))
        check(self.batch_size >= 1, f"batch_size must be >= 1 (got {self.batch_size})")
        check(self.awq_grid >= 1 and self.awq_samples >= 16, "awq_grid must be >= 1 and awq_samples >= 16")
        self._check_method()

    def _check_method(self) -> None:
        m = self.method
        if m in SPARSE_METHODS:
            check(self.sparsity is not None, f"{m} prunes: give a sparsity (e.g. 0.5) or a pattern (e.g. 2:4)")
            if self.bits is not None and m != "sparsegpt":
                raise RecoupError(f"{m} does not quantize; joint sparse + quantized compression is "
                                  f"--method sparsegpt --sparsity S --bits B")
        else:
            check(self.bits is not None, f"{m} quantizes: give bits (2-8), e.g. bits=4")
            if self.sparsity is not None:
                raise RecoupError(f"{m} does not prune; for sparse + quantized use --method sparsegpt --sparsity S --bits B")
        if self.bits is None:
            check(self.group_size is None, "group_size only applies when quantizing (give bits)")
        if m != "gptq":
            check(not self.act_order and not self.static_groups, f"act_order / static_groups are GPTQ options, not {m}")
        if self.static_groups:
            check(self.group_size is not None, "static_groups needs a group_size")
        if m == "sparsegpt" and self.pattern is not None:
            _, mm = parse_pattern(self.pattern)
            check(self.blocksize % mm == 0, f"blocksize {self.blocksize} must be a multiple of M={mm} for {self.pattern}")

    # convenience ----------------------------------------------------------------------------------
    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern) if self.pattern else None

    @property
    def prunes(self) -> bool:
        return self.sparsity is not None and (self.sparsity > 0 or self.pattern is not None)

    @property
    def quantizes(self) -> bool:
        return self.bits is not None

    def describe(self) -> str:
        parts = [self.method]
        if self.pattern:
            parts.append(self.pattern)
        elif self.sparsity is not None:
            parts.append(f"{self.sparsity:.0%}")
        if self.bits is not None:
            g = f"g{self.group_size}" if self.group_size else "per-row"
            parts.append(f"{self.bits}-bit {'sym' if self.sym else 'asym'} {g}")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
