"""Independent linears compressed side by side, one thread each.

A method whose per-linear math runs on one thread (``Method.one_thread``: SparseGPT and GPTQ, whose OBS update
is pinned to one thread so that the weights do not depend on the core count) leaves the machine's other cores
idle while it works. The linears of a group (q, k, v; gate, up), and with the dense-layer order every linear of
a decoder layer, read their statistics and nothing another one writes, so they can run at the same time, each on
one thread: each weight is computed by exactly the same operations, so the result is bitwise that of one at a
time on any number of threads; only the wall time changes.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

from recoup.compress.obs import single_thread

T = TypeVar("T")
R = TypeVar("R")


def side_by_side(fn: Callable[[T], R], items: Sequence[T], sizes: Sequence[int], workers: int) -> list[R]:
    """``[fn(item) for item in items]``, run on up to ``workers`` threads of one torch thread each, the largest
    ``sizes`` first (a long job started last would leave the other threads idle); in order of ``items``."""
    workers = min(workers, len(items))
    if workers <= 1:
        return [fn(item) for item in items]

    def one(item: T) -> R:
        with single_thread():  # this thread's own setting: the others and the caller keep theirs
            return fn(item)

    order = sorted(range(len(items)), key=lambda k: -sizes[k])
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="recoup-linear") as pool:
        futures = {k: pool.submit(one, items[k]) for k in order}
        return [futures[k].result() for k in range(len(items))]
