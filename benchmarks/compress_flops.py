"""FLOPs a compression run did, and the machine's matmul rate at the same shapes (for benchmarks/compress.py).

:class:`FlopCounter` hooks every linear (2 x tokens x rows x cols per call), every attention module
(QK^T and AV: 4 x batch x T^2 x width per call) and the statistics' ``add`` (X^T X: 2 x tokens x cols^2
for Hessians) during ``compress``; the OBS solves are counted from the report (2 x rows x cols^2 for the
lazy block updates plus ~1.3 x cols^3 for the Cholesky factorisations and the inverse). The forwards are
the ones the engine actually ran, so a re-run-per-group engine counts more FLOPs than a single pass: the
``useful`` figure counts one forward per layer, the floor. :func:`matmul_rate` times ``torch.mm`` at the
run's own shapes (linear calls and X^T X), giving the rate a perfect implementation would reach.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from typing import Iterator

import torch


class FlopCounter:
    def __init__(self) -> None:
        self.linear = 0.0
        self.attention = 0.0
        self.stats = 0.0
        self.mm_shapes: Counter = Counter()  # (m, k, n) -> calls, for the matmul reference

    @contextlib.contextmanager
    def watch(self, model: torch.nn.Module) -> Iterator["FlopCounter"]:
        from recoup.compress import stats as stats_mod

        handles = []
        for mod in model.modules():
            name = type(mod).__name__
            if isinstance(mod, torch.nn.Linear) or name == "Conv1D":
                handles.append(mod.register_forward_hook(self._linear))
            elif name.endswith("Attention"):
                handles.append(mod.register_forward_hook(self._attention, with_kwargs=True))
        orig = stats_mod.HessianStats.add
        counter = self

        def add(self_, x: torch.Tensor) -> None:
            for m, k, n in self_.products(x.numel() // x.shape[-1]):
                counter.stats += 2.0 * m * k * n
                counter.mm_shapes[(m, k, n)] += 1
            orig(self_, x)

        stats_mod.HessianStats.add = add
        try:
            yield self
        finally:
            stats_mod.HessianStats.add = orig
            for h in handles:
                h.remove()

    def _linear(self, mod, args, out) -> None:
        x = args[0]
        tokens, cols = x.numel() // x.shape[-1], x.shape[-1]
        rows = out.shape[-1]
        self.linear += 2.0 * tokens * rows * cols
        self.mm_shapes[(tokens, cols, rows)] += 1

    def _attention(self, mod, args, kwargs, out) -> None:
        h = args[0] if args else kwargs.get("hidden_states")
        o = out[0] if isinstance(out, (tuple, list)) else out
        if h is not None and h.dim() == 3:
            b, t, _ = h.shape
            self.attention += 4.0 * b * t * t * o.shape[-1]


def obs_flops(report) -> float:
    """The blocked OBS solves of a SparseGPT / GPTQ report: lazy updates plus factorisations, per linear."""
    if report.method not in ("sparsegpt", "gptq"):
        return 0.0
    return sum(2.0 * r.shape[0] * r.shape[1] ** 2 + 1.3 * r.shape[1] ** 3 for r in report.linears)


def matmul_rate(shapes: Counter, repeats: int = 2, limit: int = 8) -> float:
    """FLOP/s of ``torch.mm`` (float32, this process's threads) over the ``limit`` costliest (m, k, n) shapes,
    weighted by the FLOPs each contributes to the run: the rate the run's matmuls could reach."""
    costs = sorted(((2.0 * m * k * n * c, (m, k, n)) for (m, k, n), c in shapes.items()), reverse=True)[:limit]
    total_flops = total_time = 0.0
    for cost, (m, k, n) in costs:
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.mm(a, b)  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        per_call = (time.perf_counter() - t0) / repeats
        calls = cost / (2.0 * m * k * n)
        total_flops += cost
        total_time += per_call * calls
    return total_flops / total_time if total_time else float("nan")
