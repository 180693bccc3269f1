"""The engine's offload path (model stays put, one decoder layer at a time on the execution device).

On a CPU-only machine the offload path runs with execution device cpu (``offload=True``): every
layer still goes through the move-to / compress / move-back cycle, the prefix modules through
``prefix_on`` (recoup.model.streamer) and the argument record pass through the pass-through layers, so the compressed
weights must equal the in-place path's bit for bit. The real CUDA path is tested where a GPU exists.
"""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import tiny_loaded

from recoup.compress import CompressConfig, compress
from recoup.compress.engine import resolve_device
from recoup.data.calibration import Calibration
from recoup.errors import RecoupError
from recoup.model.anatomy import anatomy
from recoup.model.streamer import capture_inputs

CONFIGS = {
    "sparsegpt": dict(method="sparsegpt", sparsity=0.5, bits=4, group_size=16),
    "gptq": dict(method="gptq", bits=4, group_size=16, act_order=True),
    "wanda": dict(method="wanda", sparsity=0.5),
    "awq": dict(method="awq", bits=4, group_size=16),
}


def calib(n=6, t=24, seed=0) -> Calibration:
    ids = torch.randint(4, 100, (n, t), generator=torch.Generator().manual_seed(seed))
    return Calibration(input_ids=ids, corpus="random", split="train", seqlen=t, seed=seed)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_both(arch: str, cfg: dict, **kw):
    ref, off = tiny_loaded(arch, hidden=32, layers=3), tiny_loaded(arch, hidden=32, layers=3)
    rep_ref = compress(ref, CompressConfig.from_dict({**cfg, "batch_size": 4}), calib())
    rep_off = compress(off, CompressConfig.from_dict({**cfg, "batch_size": 4}), calib(), offload=True, **kw)
    return ref, off, rep_ref, rep_off


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "opt", "gpt2"])
@pytest.mark.parametrize("method", ["sparsegpt", "gptq", "wanda", "awq"])
def test_offload_equals_in_place_bitwise(arch, method):
    ref, off, rep_ref, rep_off = run_both(arch, CONFIGS[method])
    s_ref, s_off = state(ref.model), state(off.model)
    assert s_ref.keys() == s_off.keys()
    changed = 0
    for k in s_ref:
        assert torch.equal(s_ref[k], s_off[k]), k
        changed += not torch.equal(s_ref[k], state(tiny_loaded(arch, hidden=32, layers=3).model)[k])
    assert changed >= 3 * len(anatomy(ref.model).linear_names())  # the comparison saw compressed weights
    assert [r.error for r in rep_ref.linears] == [r.error for r in rep_off.linears]
    assert rep_ref.qparams.keys() == rep_off.qparams.keys()
    for k, q in rep_ref.qparams.items():
        assert all(torch.equal(q[n], rep_off.qparams[k][n]) for n in q), k
    devices = {t.device for t in list(off.model.parameters()) + list(off.model.buffers())}
    assert devices == {torch.device("cpu")}


def test_offload_moves_each_layer_there_and_back_in_order(monkeypatch):
    lm = tiny_loaded("llama", hidden=32, layers=3)
    layers = anatomy(lm.model).layers
    moves: list[tuple[int, str]] = []
    for i, layer in enumerate(layers):
        orig = layer.to

        def spy(*args, _i=i, _orig=orig, **kwargs):
            moves.append((_i, str(args[0] if args else kwargs["device"])))
            return _orig(*args, **kwargs)

        monkeypatch.setattr(layer, "to", spy)
    compress(lm, CompressConfig(method="sparsegpt", sparsity=0.5), calib(), device="cpu", offload=True)
    assert moves == [(i, "cpu") for i in range(3) for _ in range(2)]
    for layer in layers:  # the pass-through used by the record pass is gone again
        assert "forward" not in layer.__dict__


def test_offload_restores_model_when_a_layer_fails(monkeypatch):
    lm = tiny_loaded("opt", hidden=32, layers=2)
    layers = anatomy(lm.model).layers
    calls = []

    def boom(*a, **k):
        calls.append(1)
        raise RuntimeError("boom")

    monkeypatch.setattr("recoup.compress.engine._compress_groups", boom)  # fails with the forwards parked
    with pytest.raises(RuntimeError, match="boom"):
        compress(lm, CompressConfig(method="wanda", sparsity=0.5), calib(), offload=True)
    assert calls == [1]
    assert all("forward" not in layer.__dict__ for layer in layers)
    assert {p.device for p in lm.model.parameters()} == {torch.device("cpu")}


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "opt", "gpt2"])
def test_passthrough_record_pass_equals_full_forward(arch):
    """The per-layer arguments recorded with pass-through layers equal those of a real forward."""
    lm = tiny_loaded(arch, hidden=32, layers=3)
    anat, ids = anatomy(lm.model), calib().input_ids
    inps_a, rec_a = capture_inputs(lm.model, anat, ids, 4)
    inps_b, rec_b = capture_inputs(lm.model, anat, ids, 4, torch.device("cpu"), passthrough=True)
    assert torch.equal(inps_a, inps_b)
    for (args_a, kw_a, kw_flag_a), (args_b, kw_b, kw_flag_b) in zip(rec_a, rec_b, strict=True):
        assert kw_flag_a == kw_flag_b and kw_a.keys() == kw_b.keys() and len(args_a) == len(args_b)
        for a, b in list(zip(args_a, args_b, strict=True)) + [(kw_a[k], kw_b[k]) for k in kw_a]:
            flat_a, flat_b = (a if isinstance(a, (tuple, list)) else [a]), (b if isinstance(b, (tuple, list)) else [b])
            for x, y in zip(flat_a, flat_b, strict=True):
                assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def test_magnitude_offload_needs_no_calibration():
    ref, off = tiny_loaded("gpt2", layers=2), tiny_loaded("gpt2", layers=2)
    compress(ref, CompressConfig(method="magnitude", sparsity=0.5))
    compress(off, CompressConfig(method="magnitude", sparsity=0.5), offload=True)
    assert all(torch.equal(a, b) for a, b in zip(ref.model.parameters(), off.model.parameters(), strict=True))


def test_mode_is_logged(caplog):
    lm = tiny_loaded("llama", layers=2)
    with caplog.at_level(logging.INFO, logger="recoup.compress.engine"):
        compress(lm, CompressConfig(method="wanda", sparsity=0.5), calib(), offload=True)
        compress(lm, CompressConfig(method="wanda", sparsity=0.5), calib())
    assert "offload, model on cpu, one layer at a time on cpu" in caplog.text
    assert "in place on cpu" in caplog.text


def test_device_resolution_and_errors():
    cpu = torch.device("cpu")
    assert resolve_device(None, cpu) == cpu
    assert resolve_device("cpu", cpu) == cpu
    assert resolve_device("auto", cpu) == (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else cpu
    )
    with pytest.raises(RecoupError, match="unknown device 'gpu'"):
        resolve_device("gpu", cpu)
    with pytest.raises(RecoupError, match="unsupported device 'meta'"):
        resolve_device("meta", cpu)
    if not torch.cuda.is_available():
        with pytest.raises(RecoupError, match="CUDA is not available"):
            resolve_device("cuda", cpu)
    lm = tiny_loaded("llama", layers=2)
    with pytest.raises(RecoupError, match="unknown device"):
        compress(lm, CompressConfig(method="wanda", sparsity=0.5), calib(), device="gpu")


def test_cli_device_flag_rejects_unavailable_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    from helpers import save_tiny

    from recoup.cli import main

    save_tiny(tmp_path / "m", "llama")
    rc = main(
        [
            "compress",
            str(tmp_path / "m"),
            "--method",
            "magnitude",
            "--sparsity",
            "0.5",
            "--device",
            "cuda",
            "--out",
            str(tmp_path / "a"),
        ]
    )
    assert rc == 2 and "has no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("method", ["sparsegpt", "gptq", "wanda", "awq"])
def test_cuda_offload_equals_cuda_in_place_bitwise(arch, method):
    """The offload machinery on CUDA: same kernels as compressing the model in place on the GPU, so the
    same weights bit for bit, and every parameter back on the CPU."""
    ref, off = tiny_loaded(arch, hidden=64, layers=3), tiny_loaded(arch, hidden=64, layers=3)
    ref.model.to("cuda")
    cfg = CompressConfig(**CONFIGS[method], batch_size=4)
    rep_ref = compress(ref, cfg, calib(8, 32))
    rep_off = compress(off, cfg, calib(8, 32), device="cuda")
    assert {p.device.type for p in off.model.parameters()} == {"cpu"}
    assert {b.device.type for b in off.model.buffers()} <= {"cpu"}
    got = state(off.model)
    for k, v in state(ref.model).items():
        assert torch.equal(v.cpu(), got[k]), k
    assert [r.error for r in rep_ref.linears] == [r.error for r in rep_off.linears]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("method", ["sparsegpt", "gptq", "wanda"])
def test_cuda_offload_agrees_with_cpu(arch, method):
    """CPU and CUDA differ in reduction order, and the OBS solvers turn that into different near-tie
    choices (on an H100, SparseGPT's weights differed by up to 19% relative norm while each linear's
    error agreed within 5%, most within 1%), so weights are not compared one by one: the sparsity and
    the mean reconstruction error must agree. Calibration has more tokens than any layer has inputs."""
    ref, off = tiny_loaded(arch, hidden=64, layers=3), tiny_loaded(arch, hidden=64, layers=3)
    cfg = CompressConfig(**CONFIGS[method], batch_size=8)
    rep_ref = compress(ref, cfg, calib(64, 32))
    rep_off = compress(off, cfg, calib(64, 32), device="cuda")
    assert {p.device.type for p in off.model.parameters()} == {"cpu"}
    w_ref, w_off = dict(ref.model.named_parameters()), dict(off.model.named_parameters())
    for n, _ in anatomy(ref.model).iter_linears():
        a, b = w_ref[n + ".weight"].detach(), w_off[n + ".weight"].detach()
        if method != "gptq":  # GPTQ's zeros are weights that round to the grid's 0 level, not a target
            assert float((a == 0).float().mean()) == float((b == 0).float().mean()) == 0.5, n
    mean_ref = sum(r.error for r in rep_ref.linears) / len(rep_ref.linears)
    mean_off = sum(r.error for r in rep_off.linears) / len(rep_off.linears)
    assert abs(mean_ref - mean_off) <= 0.05 * mean_ref + 1e-6
