"""One forward per calibration batch per decoder layer: each true-sequential group's input computed once.

True-sequential compression (GPTQ's ``--true-sequential``) needs, for group k of a layer, statistics of
the group's input computed with groups < k already compressed. Re-running the layer from its start for
each group, then once more to propagate, costs close to three forwards per layer. Here each calibration
batch's forward of the layer runs in its own worker thread and *parks* at the pre-hook of each group's
first linear: the hook feeds the group's statistics and waits. When every batch has parked at group k,
the group is compressed and the forwards resume, so group k's linears run with their compressed weights,
exactly as a re-run would. One thread runs at a time (a hand-off, not parallelism), batches in order,
so every statistic accumulates in the same order as on the re-run path and the result is bitwise the
same. When the last group is done each forward finishes, and its output (the compressed layer's)
replaces its input: the propagate pass comes for free. Cost per layer: one forward plus the statistics.

Nothing here knows an architecture: the groups' first linears (from the anatomy map) are the only
points where a forward parks. The price is memory: a parked forward holds what the layer's code still
references (the residual, the normed input, at the MLP's down projection its intermediate activations);
:func:`parked_bytes` bounds it and the engine re-runs instead when that exceeds its budget.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any, Callable

import torch
from torch import nn

from recoup.errors import RecoupError

log = logging.getLogger(__name__)


class _Abort(Exception):
    """Unwinds a parked forward when the layer's compression failed."""


class _Worker:
    """One batch's layer forward in a thread that runs only while the main thread waits for it."""

    def __init__(self, run: Callable[[], torch.Tensor], local: threading.local) -> None:
        self.go, self.back = threading.Semaphore(0), threading.Semaphore(0)
        self.at: int | None = None  # the group it is parked at; None once finished
        self.expect = 0
        self.out: torch.Tensor | None = None
        self.exc: BaseException | None = None
        self.aborted = False
        self.thread = threading.Thread(target=self._main, args=(run, local), daemon=True)

    def _main(self, run: Callable[[], torch.Tensor], local: threading.local) -> None:
        local.worker = self
        self.go.acquire()
        try:
            if not self.aborted:
                self.out = run()
        except BaseException as exc:  # handed to the main thread by resume()
            self.exc = exc
        finally:
            self.at = None
            self.back.release()

    def park(self, k: int) -> None:
        """Called in this worker's thread by the hook of group k: hand control back and wait."""
        self.at = k
        self.back.release()
        self.go.acquire()
        if self.aborted:
            raise _Abort

    def resume(self) -> None:
        """Run this worker until it parks at the next group or finishes (main thread)."""
        self.go.release()
        self.back.acquire()
        if self.exc is not None and not isinstance(self.exc, _Abort):
            raise self.exc

    def abort(self) -> None:
        if self.thread.is_alive():
            self.aborted = True
            self.go.release()
            self.thread.join()


def parked_bytes(tokens: int, hidden: int, group_cols: list[int], element_size: int) -> int:
    """Upper estimate of what the parked forwards of ``tokens`` calibration tokens hold at once: per token
    the layer input and the residual (2 x hidden) plus the input of every group (its ``cols``), which
    covers the normed input and the MLP intermediate held at the down projection. element_size: bytes of a value
    as the layer computes (a forward casts narrower stored activations up to it)."""
    return tokens * element_size * (2 * hidden + sum(group_cols))


def available_bytes(device: torch.device) -> int:
    """Free memory of ``device``: ``cudaMemGetInfo`` on CUDA, MemAvailable (else physical pages) on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def run_parked(
    layer_call: Callable[[torch.Tensor], torch.Tensor],
    firsts: list[nn.Module],
    inps: torch.Tensor,
    batch_size: int,
    new_stats: Callable[[int], Any],
    on_group: Callable[[int, Any], None],
    device: torch.device,
    finish: bool = True,
    store: Callable[[slice, torch.Tensor], None] | None = None,
) -> None:
    """Observe, compress (``on_group(k, stats)``, in order) and propagate one layer in one forward per batch.

    layer_call(h) -> the layer's output hidden states for inputs h (b, T, H); firsts: the first linear of
    each group, in true-sequential order; inps (N, T, H) is overwritten in place by the layer's outputs
    after every group has been compressed; new_stats(k) makes the statistics object group k's hook feeds.
    ``finish`` off: the forwards are unwound after the last group instead of run to the end (nothing reads
    the last layer's output), and ``inps`` is left as it was. store(rows, out): how a batch's outputs are written
    (default ``inps[rows] = out``; the layer streamer's casts them to the activations' dtype)."""
    local = threading.local()
    current: list[Any] = [None]

    def hook_for(k: int):
        def hook(_mod, args):
            worker = getattr(local, "worker", None)
            if worker is None:  # a call from another thread than a parked forward: not ours
                return None
            if k != worker.expect:
                raise RecoupError(
                    f"the layer reached group {k} before group {worker.expect}; the anatomy map's "
                    f"sequential order does not match the layer's forward"
                )
            current[0].add(args[0].detach())
            worker.expect = k + 1
            worker.park(k)
            return None

        return hook

    def runner(rows: slice) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.no_grad(), torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                return layer_call(inps[rows])

        return run

    slices = [slice(s, s + batch_size) for s in range(0, inps.shape[0], batch_size)]
    workers = [_Worker(runner(rows), local) for rows in slices]
    handles = [m.register_forward_pre_hook(hook_for(k)) for k, m in enumerate(firsts)]
    try:
        for w in workers:
            w.thread.start()
        for k in range(len(firsts)):
            current[0] = new_stats(k)
            for w in workers:
                w.resume()
                if w.at != k:
                    raise RecoupError(
                        f"a calibration batch's layer forward finished without reaching group {k}'s "
                        f"first linear; the anatomy map does not match this model"
                    )
            on_group(k, current[0])
            current[0] = None
        for rows, w in zip(slices, workers if finish else []):
            w.resume()
            if w.at is not None:
                raise RecoupError("a layer forward parked after its last group; the anatomy map does not match")
            if store is None:
                inps[rows] = w.out
            else:
                store(rows, w.out)
            w.out = None
    finally:
        for h in handles:
            h.remove()
        for w in workers:
            w.abort()
