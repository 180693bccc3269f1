"""The quantization grid: ``bits``, group size (ragged last group allowed), symmetric or asymmetric.

Weights are (rows, cols) = (out_features, in_features); a *group* is ``group_size`` consecutive
input columns of one row (GPTQ's grouping). The grid of a group is ``scale * (q - zero)`` with
integer codes ``q`` in ``[0, 2**bits - 1]``. Parameters are fitted as in GPTQ's ``Quantizer``
(min/max with zero forced into the range; symmetric uses ``zero = (maxq + 1) / 2``), so exact 0 is
always a grid point, which is what lets pruned weights stay on the grid in joint compression.
``search="mse"`` shrinks each group's range to the one of least quantization error (GPTQ's
``Quantizer(mse=True)``, llm-compressor's MSE observer) instead of taking min/max as is.

``scale_dtype="float16"`` rounds every fitted scale to a float16 value (before the zero point is
fitted), so a symmetric 4-bit grid of groups that are a multiple of 32 is exactly a GGUF Q4_0 grid
(fp16 ``d``, value ``d * (q - 8)``) and a symmetric 8-bit one exactly Q8_0: a GPTQ / SparseGPT / AWQ
pass run on such a grid exports to GGUF without any rounding.
"""

from __future__ import annotations

import dataclasses

import torch

SCALE_DTYPES = ("float32", "float16")
SEARCHES = ("minmax", "mse")
# The MSE range search (GPTQ's ``Quantizer(mse=True)``, llm-compressor's MSE observer): candidate ranges
# shrink the min/max range by 1%, 2%, ... up to MSE_MAXSHRINK; the one of least sum |q(w) - w|^MSE_NORM wins.
MSE_GRID, MSE_MAXSHRINK, MSE_NORM = 100, 0.2, 2.4


@dataclasses.dataclass(frozen=True)
class QuantGrid:
    bits: int
    sym: bool = True
    group_size: int | None = None  # None: one group per row
    scale_dtype: str = "float32"  # float16: scales rounded to fp16 (GGUF Q4_0 / Q8_0 hold them exactly)
    search: str = "minmax"  # minmax: the group's range; mse: the shrunk range of least error (module doc)

    def __post_init__(self) -> None:
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if self.search not in SEARCHES:
            raise ValueError(f"search must be one of {', '.join(SEARCHES)}, got {self.search!r}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def num_groups(self, cols: int) -> int:
        g = self.group_size or cols
        return (cols + g - 1) // g

    def group_index(self, cols: int) -> torch.Tensor:
        """(cols,) int32: the group of each input column (the last group may be ragged)."""
        g = self.group_size or cols
        return (torch.arange(cols) // g).to(torch.int32)

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row (scale, zero), each (rows,), for the columns of ``w`` (rows, g).

        ``search="minmax"``: the range is the row's min/max (zero included). ``search="mse"``: the range
        is shrunk by p in {1, 0.99, ..., 1 - MSE_MAXSHRINK} and each row keeps the p of least
        ``sum |q(w) - w|^2.4`` (GPTQ's ``Quantizer(mse=True)`` criterion; the grid still holds exact 0).
        """
        w = w.float()
        zeros = torch.zeros(w.shape[0], device=w.device)
        xmin = torch.minimum(w.min(dim=1).values, zeros)
        xmax = torch.maximum(w.max(dim=1).values, zeros)
        if self.sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = torch.where(xmin < 0, -xmax, xmin)
        empty = (xmin == 0) & (xmax == 0)
        xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
        xmax = torch.where(empty, torch.ones_like(xmax), xmax)
        scale, zero = self._params(xmin, xmax)
        if self.search == "mse":
            best = (self.quantize(w, scale, zero) - w).abs().pow(MSE_NORM).sum(1)
            for i in range(1, int(MSE_MAXSHRINK * MSE_GRID) + 1):
                p = 1 - i / MSE_GRID
                s1, z1 = self._params(p * xmin, p * xmax)
                err = (self.quantize(w, s1, z1) - w).abs().pow(MSE_NORM).sum(1)
                better = err < best
                best = torch.where(better, err, best)
                scale, zero = torch.where(better, s1, scale), torch.where(better, z1, zero)
        return scale, zero

    def _params(self, xmin: torch.Tensor, xmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) of the grid spanning [xmin, xmax] per row (xmin <= 0 <= xmax, not both 0)."""
        scale = (xmax - xmin) / self.maxq
        if self.scale_dtype == "float16":  # smallest fp16 subnormal keeps tiny groups off a zero scale
            scale = scale.to(torch.float16).float().clamp_min(2.0**-24)
        if self.sym:
            zero = torch.full_like(scale, (self.maxq + 1) / 2)
        else:
            zero = torch.round(-xmin / scale)
        return scale, zero

    def codes(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Integer codes (as float) of ``w`` (rows, k) on per-row grids ``scale``/``zero`` (rows,) or (rows, k)."""
        if scale.dim() == 1:
            scale, zero = scale[:, None], zero[:, None]
        return torch.clamp(torch.round(w / scale) + zero, 0, self.maxq)

    def quantize(
        self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, keep_nonzero: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Fake-quantize ``w`` (rows, k) to its grid. Where ``keep_nonzero`` is True a weight that would
        round to the code of exact zero takes the nearest non-zero code instead (joint sparse +
        quantized compression keeps the sparsity mask exact)."""
        q = self.codes(w, scale, zero)
        if scale.dim() == 1:
            scale, zero = scale[:, None], zero[:, None]
        if keep_nonzero is not None:
            zero_b = zero.expand_as(q)
            hits = keep_nonzero & (q == zero_b)
            if hits.any():
                step = torch.where(w >= 0, 1.0, -1.0)
                alt = zero_b + step
                alt = torch.where((alt < 0) | (alt > self.maxq), zero_b - step, alt)
                q = torch.where(hits, alt, q)
        return scale * (q - zero)

    def quantize_matrix(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Round-to-nearest of a whole (rows, cols) matrix: (dequantized w, scale, zero), the last two
        (rows, groups)."""
        rows, cols = w.shape
        g = self.group_size or cols
        out = torch.empty_like(w, dtype=torch.float32)
        scales, zeros = [], []
        for start in range(0, cols, g):
            block = w[:, start : start + g].float()
            s, z = self.fit(block)
            out[:, start : start + g] = self.quantize(block, s, z)
            scales.append(s)
            zeros.append(z)
        return out, torch.stack(scales, 1), torch.stack(zeros, 1)


def grid_deviation(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor, maxq: int) -> float:
    """Largest distance (in grid steps) of any weight of ``w`` (rows, cols) from its group's grid,
    counting codes outside ``[0, maxq]`` as off the grid. 0 means every weight is on its grid."""
    g = g_idx.long()
    s, z = scale.float()[:, g], zero.float()[:, g]
    code = w.float() / s + z
    dev = (code - torch.round(code)).abs()
    outside = ((torch.round(code) < 0) | (torch.round(code) > maxq)).float() * 1e9
    return float(torch.maximum(dev, outside).max()) if w.numel() else 0.0
