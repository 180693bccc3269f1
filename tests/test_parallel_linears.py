"""Linears compressed side by side (``Method.one_thread``): bitwise the weights of one at a time.

Each linear's OBS update runs on one thread either way (its own ``single_thread``), so running the independent
linears of a group (and with the dense-layer order every linear of a layer) on several threads changes when
each is computed, never how: the weights, OBS losses and report order must be identical (the reported relative
errors are sums over the whole matrix at the thread count of wherever they ran, so they may differ in rounding)."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import tiny_loaded

import recoup.compress.engine as engine
from recoup.compress import CompressConfig, compress
from recoup.compress.parallel import side_by_side
from recoup.data.calibration import Calibration
from recoup.model.anatomy import anatomy


def calib(n=6, t=24, seed=0) -> Calibration:
    ids = torch.randint(4, 100, (n, t), generator=torch.Generator().manual_seed(seed))
    return Calibration(input_ids=ids, corpus="random", split="train", seqlen=t, seed=seed)


def run(arch: str, cfg: dict):
    lm = tiny_loaded(arch, hidden=32, layers=2)
    anat = anatomy(lm.model)
    rep = compress(lm, CompressConfig.from_dict({**cfg, "batch_size": 4}), calib())
    return {n: anat.weight_matrix(m).detach().clone() for n, m in anat.iter_linears()}, rep, anat.spec.sequential


@pytest.mark.parametrize("arch", ["llama", "qwen3", "opt", "gpt2"])
@pytest.mark.parametrize(
    "cfg",
    [
        dict(method="sparsegpt", sparsity=0.5),  # dense order: every linear at once
        dict(method="sparsegpt", pattern="2:4", bits=4, group_size=16),  # true-sequential
        dict(method="gptq", bits=3, group_size=16),
    ],
    ids=["sparsegpt", "joint-2of4", "gptq"],
)
def test_side_by_side_is_bitwise_one_at_a_time(arch, cfg, monkeypatch):
    threads_seen = set()
    method = engine.METHODS.get(cfg["method"])
    orig = method.compress_linear

    def spy(*a, **k):
        threads_seen.add(threading.current_thread().name)
        return orig(*a, **k)

    object.__setattr__(method, "compress_linear", spy)  # a frozen dataclass; restored below
    try:
        with_threads = torch.get_num_threads()
        torch.set_num_threads(3)
        try:
            side, rep_side, groups = run(arch, cfg)
            dense_order = not CompressConfig.from_dict(cfg).options.true_sequential
            # it did run side by side wherever two linears were independent (GPT-2's groups are single linears)
            assert any(n.startswith("recoup-linear") for n in threads_seen) == (
                dense_order or max(map(len, groups)) > 1
            )
            threads_seen.clear()
            monkeypatch.setattr(engine, "side_by_side", lambda fn, items, sizes, workers: [fn(x) for x in items])
            one, rep_one, _ = run(arch, cfg)
            assert not any(n.startswith("recoup-linear") for n in threads_seen)
        finally:
            torch.set_num_threads(with_threads)
    finally:
        object.__setattr__(method, "compress_linear", orig)
    assert side.keys() == one.keys()
    for name in side:
        assert torch.equal(side[name], one[name]), name
    assert [r.name for r in rep_side.linears] == [r.name for r in rep_one.linears]
    assert [r.info["obs_loss"] for r in rep_side.linears] == [r.info["obs_loss"] for r in rep_one.linears]


def test_side_by_side_keeps_order_starts_largest_and_raises():
    started = []

    def fn(x):
        started.append(x)
        if x == "boom":
            raise ValueError("boom")
        return x * 2

    assert side_by_side(fn, [1, 2, 3], [1, 2, 3], 1) == [2, 4, 6]
    assert started == [1, 2, 3]  # one worker: in order, on the caller's thread
    started.clear()
    assert side_by_side(fn, [1, 2, 3, 4], [1, 9, 5, 3], 2) == [2, 4, 6, 8]
    assert started[:2] and set(started[:2]) == {2, 3}  # the two largest were submitted first
    with pytest.raises(ValueError, match="boom"):
        side_by_side(fn, [1, "boom"], [1, 1], 2)


def test_side_by_side_threads_run_on_one_torch_thread_and_leave_the_caller_alone():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = side_by_side(lambda _x: torch.get_num_threads(), [0, 1, 2], [1, 1, 1], 2)
        assert seen == [1, 1, 1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_side_by_side_holds_one_wave_of_results():
    """Linears compressed side by side run in waves of as many as threads: when a linear starts, the results
    alive from the others are at most those of its own wave (a layer's seven results at once were 5 GB on an 8B
    layer with GPTQ); the results placed in the layer keep no float32 weight or mask."""
    import weakref

    method = engine.METHODS.get("sparsegpt")
    orig = method.compress_linear
    lock = threading.Lock()
    earlier: list[weakref.ref] = []
    alive_at_start: list[int] = []

    def counting(*a, **k):
        with lock:
            alive_at_start.append(sum(ref() is not None for ref in earlier))
        res = orig(*a, **k)
        with lock:
            earlier.extend([weakref.ref(res.weight), weakref.ref(res.mask)])
        return res

    object.__setattr__(method, "compress_linear", counting)  # a frozen dataclass; restored below
    with_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        run("llama", dict(method="sparsegpt", sparsity=0.5))  # dense order: a layer's seven linears at once
    finally:
        torch.set_num_threads(with_threads)
        object.__setattr__(method, "compress_linear", orig)
    assert len(alive_at_start) == 14
    assert max(alive_at_start) <= 2  # the other linear of the wave (its weight and mask), never earlier waves'
