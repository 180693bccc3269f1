"""Calibration statistics fed by the engine's hooks; each consumes inputs x of shape (..., cols).

- :class:`HessianStats`: float32 running sum of X^T X (lower block triangle, mirrored) and the token count;
  ``hessian()`` is ``2/n * X^T X`` as in GPTQ/SparseGPT. Adding batches one at a time equals adding them at once.
- :class:`ActNormStats`: per-input-column sum of squares (Wanda's ||X_j||_2^2).
- :class:`ActSampleStats`: mean |x| per column plus a strided sample of input rows (AWQ's search).
- :class:`BlockIOStats`: those, plus the inputs (args, kwargs) of whole calls of the block whose output
  AWQ's loss is measured on (the attention or MLP module), on up to ``block_tokens`` tokens (None: every call),
  and optionally a :class:`HessianStats` of every input (AWQ rounded by GPTQ).

:func:`relative_error` measures a compressed weight's error with whichever of them the layer gathered.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch

from recoup.blocks import row_blocks


class FactorCache(dict):
    """What the OBS update derives from one Hessian, keyed by its settings; ``lock``: held while an entry is
    computed, so linears compressed side by side compute it once."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()


class HessianStats:
    """Running X^T X. X^T X is symmetric, so for ``cols >= BLOCKED_FROM`` only the column blocks on and
    below the diagonal are multiplied (``BLOCKS`` blocks: 10 of 16 block products, about a third less
    work than one full matmul) and ``xtx`` mirrors the lower triangle. Each entry is still one dot product over
    the tokens; the sums differ from a full matmul's only in rounding order (relative 1e-7), and the result is
    exactly symmetric."""

    BLOCKS = 4
    BLOCKED_FROM = 256

    def __init__(self, cols: int, device: torch.device | str = "cpu") -> None:
        self.cols = cols
        self._acc: torch.Tensor | None = torch.zeros(cols, cols, dtype=torch.float32, device=device)
        self._block = -(-cols // self.BLOCKS) if cols >= self.BLOCKED_FROM else 0
        self._full: torch.Tensor | None = None
        self.count = 0
        self.factors = FactorCache()  # what the OBS update derives from this Hessian, shared by the group's linears

    def products(self, tokens: int) -> list[tuple[int, int, int]]:
        """The (m, k, n) matmuls one ``add`` of ``tokens`` rows runs (for FLOP counting)."""
        cols = self.cols
        if not self._block:
            return [(cols, tokens, cols)]
        return [(min(self._block, cols - i), tokens, min(i + self._block, cols)) for i in range(0, cols, self._block)]

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if self._acc is None:  # read as xtx before: its mirror holds the same lower triangle, which is all add uses
            self._acc, self._full = self._full, None
        if self._block:
            xt, b = x.t(), self._block
            for i in range(0, x.shape[1], b):
                self._acc[i : i + b, : i + b].addmm_(xt[i : i + b], x[:, : i + b])
        else:
            self._acc.addmm_(x.t(), x)
        self._full = None
        self.factors = FactorCache()
        self.count += x.shape[0]

    @property
    def xtx(self) -> torch.Tensor:
        """(cols, cols) sum of x^T x over every token added."""
        if not self._block:
            return self._acc
        if self._full is None:
            self._full = torch.tril(self._acc) + torch.tril(self._acc, -1).t()
            self._acc = None  # one (cols, cols) matrix kept, not two (0.8 GB each for an 8B model's down_proj)
        return self._full

    @property
    def hessian_scale(self) -> float:
        """2/n: ``hessian() == hessian_scale * xtx``."""
        return 2.0 / max(self.count, 1)

    def hessian(self) -> torch.Tensor:
        """(cols, cols) = 2/n * sum x x^T."""
        return self.xtx * self.hessian_scale


class ActNormStats:
    def __init__(self, cols: int, device: torch.device | str = "cpu") -> None:
        self.sq = torch.zeros(cols, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sq += (x * x).sum(dim=0)
        self.count += x.shape[0]

    def norms(self) -> torch.Tensor:
        """(cols,) ||X_j||_2 over every calibration token."""
        return self.sq.sqrt()


class ActSampleStats:
    """Mean absolute activation per column and up to ``max_rows`` input rows spread over ``calls`` batches."""

    def __init__(self, cols: int, max_rows: int, calls: int, device: torch.device | str = "cpu") -> None:
        self.abs_sum = torch.zeros(cols, dtype=torch.float32, device=device)
        self.count = 0
        self.per_call = max(1, -(-max_rows // max(calls, 1)))
        self.rows: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.abs_sum += x.abs().sum(dim=0)
        self.count += x.shape[0]
        idx = torch.linspace(0, x.shape[0] - 1, min(self.per_call, x.shape[0]), device=x.device).long()
        self.rows.append(x[idx].clone())

    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)

    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows, dim=0)


class BlockIOStats(ActSampleStats):
    """ActSampleStats plus the recorded calls of ``parent`` (the engine hooks it): calls spread over the
    ``calls`` calibration batches until ``block_tokens`` tokens are kept (None: every call). Tensors are kept by
    reference (the engine does not reuse them while the group is processed). ``hessian``: also keep X^T X of every input
    (``self.hessian``, a :class:`HessianStats`)."""

    def __init__(
        self,
        cols: int,
        max_rows: int,
        calls: int,
        device: torch.device | str = "cpu",
        parent: torch.nn.Module | None = None,
        block_tokens: int | None = None,
        hessian: bool = False,
    ) -> None:
        super().__init__(cols, max_rows, calls, device)
        self.parent, self.block_tokens, self.calls = parent, block_tokens, max(calls, 1)
        self.hessian = HessianStats(cols, device) if hessian else None
        self.inputs: list[tuple[tuple, dict]] = []
        self._seen, self._kept, self._stride = 0, 0, 0

    def add(self, x: torch.Tensor) -> None:
        super().add(x)
        if self.hessian is not None:
            self.hessian.add(x)

    def add_call(self, args: tuple, kwargs: dict) -> None:
        """Record one call of ``parent`` (args, kwargs), if it is one of the spread-out calls to keep."""
        x = args[0] if args else kwargs["hidden_states"]
        tokens = x.numel() // x.shape[-1]
        if not self._stride:
            needed = self.calls if self.block_tokens is None else -(-self.block_tokens // max(tokens, 1))
            self._stride = max(1, self.calls // needed)
        if self._seen % self._stride == 0 and (self.block_tokens is None or self._kept < self.block_tokens):
            self.inputs.append((tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), dict(kwargs)))
            self._kept += tokens
        self._seen += 1


STATS_KINDS = ("none", "hessian", "act_norm", "act_sample", "block_io")


def relative_error(w0: torch.Tensor, w1: torch.Tensor, stats) -> tuple[float, str]:
    """Relative reconstruction error of w1 vs w0 (rows, cols): ||dW X||^2 / ||W X||^2 where stats allow.

    The weighted sums run over blocks of rows (float64 totals), so the temporaries are a block's size rather
    than several copies of the matrix."""
    if isinstance(stats, HessianStats):
        h = stats.xtx
        return _ratio_by_rows(w0, w1, lambda m: (m @ h) * m), "output"
    if isinstance(stats, ActNormStats):
        return _ratio_by_rows(w0, w1, lambda m: m * m * stats.sq), "act_norm"
    if isinstance(stats, ActSampleStats):
        x = stats.sample()
        if getattr(stats, "input_scale", None) is not None:  # AWQ folded 1/s into the op producing x
            x = x / stats.input_scale[None, :]
        d = w1 - w0
        return float(((x @ d.t()) ** 2).sum() / ((x @ w0.t()) ** 2).sum().clamp(min=1e-30)), "sample"
    return _ratio_by_rows(w0, w1, lambda m: m * m), "weight"


def _ratio_by_rows(w0: torch.Tensor, w1: torch.Tensor, quad: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """sum(quad(w1 - w0)) / sum(quad(w0)) with ``quad`` row-separable, computed a block of rows at a time."""
    num = den = 0.0
    for rows in row_blocks(*w0.shape):
        a = w0[rows]
        num += float(quad(w1[rows] - a).sum())
        den += float(quad(a).sum())
    return num / max(den, 1e-30)
