"""Packed artifact storage: bit-packed codes / bitmasks load back to the same weights, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import save_tiny, tiny_loaded

from recoup.artifact.fingerprint import compression_fingerprint
from recoup.artifact.packing import PACKED_FILE, encode_linear, pack_bits, packed_nbytes, unpack_bits
from recoup.artifact.store import (
    load_artifact,
    load_qparams,
    repack_artifact,
    save_artifact,
    seal_manifest,
)
from recoup.cli import main
from recoup.compress import CompressConfig, compress
from recoup.data.calibration import Calibration
from recoup.errors import RecoupError
from recoup.model.anatomy import anatomy

X = torch.randint(4, 100, (2, 24), generator=torch.Generator().manual_seed(1))


def calib(n=8, t=32) -> Calibration:
    ids = torch.randint(4, 100, (n, t), generator=torch.Generator().manual_seed(0))
    return Calibration(input_ids=ids, corpus="random", split="train", seqlen=t, seed=0)


def disk_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def both(tmp_path, lm, rep):
    """Save ``lm`` packed and dense; check logits are bitwise the in-memory ones; return both loaded."""
    ref = lm.model(X).logits
    packed = load_artifact(save_artifact(lm, rep, tmp_path / "packed"))
    dense = load_artifact(save_artifact(lm, rep, tmp_path / "dense", storage="dense"))
    assert torch.equal(packed.model(X).logits, ref)
    assert torch.equal(dense.model(X).logits, ref)
    for (k, a), (_, b) in zip(packed.model.state_dict().items(), lm.model.state_dict().items(), strict=True):
        assert torch.equal(
            a.view(torch.uint8) if a.dtype.is_floating_point else a,
            b.view(torch.uint8) if b.dtype.is_floating_point else b,
        ), k
    assert packed.manifest["format_version"] == 2 and dense.manifest["format_version"] == 1
    assert packed.manifest["storage"]["kind"] == "packed" and dense.manifest["storage"]["kind"] == "dense"
    for art in (packed, dense):  # the manifest's size is what is on disk, less the manifest itself
        assert art.manifest["storage"]["bytes"] == disk_bytes(art.path) - (art.path / "recoup.json").stat().st_size
    assert disk_bytes(packed.path) < disk_bytes(dense.path)
    assert (
        compression_fingerprint(packed.model, packed.manifest)["digest"]
        == compression_fingerprint(lm.model, rep.to_dict(), rep.qparams)["digest"]
    )
    return packed, dense


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 13, 1000])
def test_pack_bits_round_trip_and_exact_size(bits, n):
    v = torch.randint(0, 2**bits, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    p = pack_bits(v, bits)
    assert p.dtype == torch.uint8 and p.numel() == packed_nbytes(n, bits) == -(-n * bits // 8)
    assert torch.equal(unpack_bits(p, bits, n), v)


def test_pack_bits_layout_is_little_endian():
    assert pack_bits(torch.tensor([1, 2]), 4).tolist() == [0x21]
    assert pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 1]), 1).tolist() == [1, 1]
    assert pack_bits(torch.tensor([7, 1, 0]), 3).tolist() == [0b01111, 0]


@pytest.mark.parametrize("bits,sym", [(2, True), (3, True), (3, False), (4, True), (8, False)])
def test_rtn_ragged_groups_round_trip_bitwise(tmp_path, bits, sym):
    lm = tiny_loaded("llama", hidden=40, layers=2)  # 40 and 120 columns: ragged last group of 16
    rep = compress(lm, CompressConfig(method="rtn", bits=bits, group_size=16, sym=sym), None)
    assert any(q["g_idx"].bincount().min() < 16 for q in rep.qparams.values())
    packed, dense = both(tmp_path, lm, rep)
    storage = packed.manifest["storage"]
    assert storage["packed_linears"] == {"codes": 14} and storage["dense_linears"] == 0
    numel = sum(r.shape[0] * r.shape[1] for r in rep.linears)
    assert storage["file_bytes"][PACKED_FILE] < numel * bits / 8 + 4096  # codes take `bits` bits (+ header)
    assert storage["file_bytes"]["model.safetensors"] < dense.manifest["storage"]["file_bytes"]["model.safetensors"]


def test_gptq_act_order_round_trip_bitwise(tmp_path):
    lm = tiny_loaded("qwen2", hidden=40, layers=2)
    rep = compress(
        lm,
        CompressConfig.from_dict(dict(method="gptq", bits=4, group_size=8, act_order=True, static_groups=False)),
        calib(),
    )
    assert any(not bool((q["g_idx"][1:] >= q["g_idx"][:-1]).all()) for q in rep.qparams.values())  # permuted
    packed, _ = both(tmp_path, lm, rep)
    assert packed.manifest["storage"]["dense_linears"] == 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D stores weights transposed
def test_joint_sparsegpt_4bit_uses_mask_and_codes(tmp_path, arch):
    lm = tiny_loaded(arch, hidden=32, layers=2)
    rep = compress(lm, CompressConfig(method="sparsegpt", sparsity=0.5, bits=4, group_size=16), calib())
    packed, _ = both(tmp_path, lm, rep)
    storage = packed.manifest["storage"]
    assert storage["packed_linears"] == {"mask_codes": len(rep.linears)}
    numel = sum(r.shape[0] * r.shape[1] for r in rep.linears)
    assert storage["file_bytes"][PACKED_FILE] < numel * (1 + 0.5 * 4) / 8 + 8192  # 3 bits a weight, not 4
    assert abs(compression_fingerprint(packed.model, packed.manifest)["sparsity"] - 0.5) < 0.01


def test_magnitude_2_4_stores_mask_and_kept_values(tmp_path):
    lm = tiny_loaded("mistral", hidden=32, layers=2)
    rep = compress(lm, CompressConfig(method="magnitude", pattern="2:4"), None)
    packed, dense = both(tmp_path, lm, rep)
    assert packed.manifest["storage"]["packed_linears"] == {"mask_values": 14}
    assert not (packed.path / "quant_params.safetensors").exists()


@pytest.mark.parametrize("rounding", ["rtn", "gptq"])
def test_awq_linears_rescaled_after_quantization_stay_on_their_grids_and_pack(tmp_path, rounding):
    lm = tiny_loaded("llama", hidden=32, layers=2)
    rep = compress(
        lm,
        CompressConfig.from_dict(dict(method="awq", bits=4, group_size=16, grid=4, samples=256, rounding=rounding)),
        calib(),
    )
    # down_proj's scales divide up_proj's rows after up_proj was quantized: its codes move to rescaled grids
    folded = sum(r.info.get("awq_folded_into") == "mlp.up_proj" and r.info["awq_scale_spread"] > 1 for r in rep.linears)
    assert folded >= 1
    packed, dense = both(tmp_path, lm, rep)
    storage = packed.manifest["storage"]
    assert storage["dense_linears"] == 0 and storage["packed_linears"] == {"codes": 14}
    assert all(torch.equal(t, dense.model.state_dict()[k]) for k, t in packed.model.state_dict().items())


def test_bfloat16_model_round_trip_bitwise(tmp_path):
    lm = tiny_loaded("llama", hidden=32, layers=1)
    lm.model.to(torch.bfloat16)
    rep = compress(lm, CompressConfig(method="rtn", bits=4, group_size=16), None)
    packed = load_artifact(save_artifact(lm, rep, tmp_path / "p"), dtype="bfloat16")
    dense = load_artifact(save_artifact(lm, rep, tmp_path / "d", storage="dense"), dtype="bfloat16")
    assert packed.manifest["storage"]["packed_linears"] == {"codes": 7}
    sd = lm.model.state_dict()  # (in-memory logits differ: .to(bfloat16) also cast the rotary buffers)
    assert all(torch.equal(t.view(torch.int16), sd[k].view(torch.int16)) for k, t in packed.model.state_dict().items())
    assert torch.equal(packed.model(X).logits, dense.model(X).logits)


def test_float32_artifact_loaded_as_bfloat16_matches_dense(tmp_path):
    lm = tiny_loaded("qwen3", hidden=32, layers=1)
    rep = compress(lm, CompressConfig(method="sparsegpt", sparsity=0.5, bits=3, group_size=16), calib())
    packed = load_artifact(save_artifact(lm, rep, tmp_path / "p"), dtype="bfloat16")
    dense = load_artifact(save_artifact(lm, rep, tmp_path / "d", storage="dense"), dtype="bfloat16")
    sd = dense.model.state_dict()
    assert all(
        torch.equal(t.view(torch.int16), sd[k].view(torch.int16))
        for k, t in packed.model.state_dict().items()
        if t.dtype == torch.bfloat16
    )
    assert torch.equal(packed.model(X).logits, dense.model(X).logits)


def test_a_weight_that_is_off_its_grid_stays_dense():
    w = torch.randn(8, 16)
    rep_grid = {
        "scale": torch.full((8, 1), 0.1),
        "zero": torch.full((8, 1), 8.0),
        "g_idx": torch.zeros(16, dtype=torch.int32),
    }
    assert encode_linear(w, rep_grid, 4) is None  # codes out of range: not representable
    on = (torch.round(w / 0.1).clamp(-8, 7)) * torch.tensor(0.1) + 0.0  # on the grid (+ 0.0: no -0.0)
    on[0, 0] = on[0, 0] / 1.0001  # one weight a hair off the grid (as AWQ's rescaled preceding linear)
    assert encode_linear(on, rep_grid, 4) is None
    on[0, 0] = torch.tensor(0.1) * 3  # back on the grid (float32 arithmetic, as the quantizer does)
    assert encode_linear(on, rep_grid, 4).meta["encoding"] == "codes"
    assert encode_linear(torch.randn(4, 4), None, None) is None  # nothing to gain: dense


def test_old_dense_artifact_without_storage_still_loads(tmp_path):
    lm = tiny_loaded("llama", hidden=32, layers=2)
    rep = compress(lm, CompressConfig(method="sparsegpt", sparsity=0.5, bits=4, group_size=16), calib())
    out = save_artifact(lm, rep, tmp_path / "old", storage="dense")
    manifest = json.loads((out / "recoup.json").read_text())
    del manifest["storage"]  # what recoup wrote before packed storage existed
    del manifest["manifest_sha256"]  # ... and before manifests were sealed
    manifest["format_version"] = 1
    (out / "recoup.json").write_text(json.dumps(manifest))
    old = load_artifact(out)
    assert torch.equal(old.model(X).logits, lm.model(X).logits)
    new = load_artifact(repack_artifact(out, tmp_path / "new"))  # and converts to packed
    assert torch.equal(new.model(X).logits, lm.model(X).logits)
    assert new.manifest["layers"] == manifest["layers"] and new.manifest["recipe"] == manifest["recipe"]
    assert disk_bytes(new.path) < disk_bytes(out) / 2
    assert torch.equal(
        load_qparams(new.path)["model.layers.0.mlp.up_proj"]["zero"],
        load_qparams(out)["model.layers.0.mlp.up_proj"]["zero"],
    )


def test_corrupted_or_inconsistent_packed_artifacts_give_one_clear_line(tmp_path):
    lm = tiny_loaded("llama", hidden=32, layers=1)
    rep = compress(lm, CompressConfig(method="rtn", bits=3, group_size=16), None)
    out = save_artifact(lm, rep, tmp_path / "a")
    data = (out / PACKED_FILE).read_bytes()
    (out / PACKED_FILE).write_bytes(data[:-8] + b"\x00garbage")
    with pytest.raises(RecoupError, match=f"corrupted: {PACKED_FILE} does not match its sha256"):
        load_artifact(out)
    (out / PACKED_FILE).unlink()
    with pytest.raises(RecoupError, match=f"incomplete: {PACKED_FILE} is missing"):
        load_artifact(out)
    out = save_artifact(lm, rep, tmp_path / "b")
    manifest = json.loads((out / "recoup.json").read_text())
    manifest["storage"]["tensors"].popitem()  # the manifest no longer names every packed weight
    (out / "recoup.json").write_text(json.dumps(seal_manifest(manifest)))  # resealed: the deeper check still holds
    with pytest.raises(RecoupError, match="not the packed ones; the artifact is corrupted"):
        load_artifact(out)
    manifest["storage"]["kind"] = "dense"  # a manifest edited to dense: the packed weights would be random
    (out / "recoup.json").write_text(json.dumps(seal_manifest(manifest)))
    with pytest.raises(RecoupError, match="not the packed ones; the artifact is corrupted"):
        load_artifact(out)
    manifest["format_version"] = 3
    (out / "recoup.json").write_text(json.dumps(manifest))
    with pytest.raises(RecoupError, match="newer than this recoup reads"):
        load_artifact(out)
    with pytest.raises(RecoupError, match="did you mean 'packed'"):
        save_artifact(lm, rep, tmp_path / "c", storage="packd")


def test_cli_storage_flag(tmp_path, capsys):
    src = tmp_path / "tiny"
    save_tiny(src, "llama", hidden=32, layers=2)
    sizes = {}
    for storage in ("packed", "dense"):
        out = tmp_path / storage
        assert (
            main(
                [
                    "compress",
                    str(src),
                    "--method",
                    "rtn",
                    "--bits",
                    "4",
                    "--group-size",
                    "16",
                    "--storage",
                    storage,
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        assert f"({storage}, " in capsys.readouterr().out
        sizes[storage] = json.loads((out / "recoup.json").read_text())["storage"]["bytes"]
    assert sizes["packed"] < sizes["dense"]
    a, b = load_artifact(tmp_path / "packed"), load_artifact(tmp_path / "dense")
    assert torch.equal(a.model(X).logits, b.model(X).logits)
    assert {n for n, _ in anatomy(a.model).iter_linears()} == {r["name"] for r in a.manifest["layers"]}


@pytest.mark.parametrize("kind", ["codes", "mask_codes", "mask_values", "mask_values_bf16"])
def test_packing_in_row_blocks_and_chunks_gives_the_whole_matrix_bytes(monkeypatch, kind):
    """Packing, its bit-for-bit check and decoding run a block of rows (and a chunk of values) at a time, so an
    8B model's largest linear makes no whole-size float temporary. Tiny matrices fit one block, so the blocks and
    chunks are made small here (several per matrix, the last short): the same bytes, the same decoded bits."""
    from recoup import blocks
    from recoup.artifact import packing

    g = torch.Generator().manual_seed(3)
    rows, cols, group = 37, 48, 16
    scale = torch.rand(rows, cols // group, generator=g) * 0.1 + 0.01
    zero = torch.full((rows, cols // group), 7.0)
    g_idx = torch.arange(cols, dtype=torch.int32) // group
    q = torch.randint(0, 16, (rows, cols), generator=g).float()
    w = packing.dequantize(q, scale, zero, g_idx)
    grid = {"scale": scale, "zero": zero, "g_idx": g_idx}
    keep = torch.rand(rows, cols, generator=g) > 0.5
    if kind == "codes":
        w, qp = w + 0.0, grid
    elif kind == "mask_codes":
        w, qp = torch.where(keep, w, torch.zeros(())), grid
    else:
        w, qp = torch.where(keep, torch.randn(rows, cols, generator=g), torch.zeros(())), None  # no -0.0
        w = w.to(torch.bfloat16) if kind.endswith("bf16") else w
    whole = encode_linear(w, qp, 4 if qp else None)
    assert whole is not None and whole.meta["encoding"] == kind.removesuffix("_bf16")
    monkeypatch.setattr(blocks, "ROW_BLOCK_ELEMENTS", 5 * cols)  # 8 row blocks, the last short
    monkeypatch.setattr(packing, "PACK_CHUNK", 24)  # several chunks per packed tensor, the last short
    assert len(blocks.row_blocks(rows, cols)) == 8
    blocked = encode_linear(w, qp, 4 if qp else None)
    assert blocked.meta == whole.meta and blocked.tensors.keys() == whole.tensors.keys()
    for k in whole.tensors:
        assert torch.equal(blocked.tensors[k], whole.tensors[k]), k
    back = packing.decode_linear(blocked.meta, blocked.tensors, qp, w.dtype)
    assert torch.equal(back.view(torch.uint8), w.contiguous().view(torch.uint8))
    if qp:  # the grid codes agree with the whole-matrix expression
        assert torch.equal(packing.grid_codes(w, scale, zero, g_idx, 15), torch.round(w / scale[:, g_idx.long()] + 7))
        off = w.clone()  # a weight a third of a step off its grid, in the last (short) block: found, kept dense
        off[rows - 1, cols - 1] += scale[rows - 1, -1] * 0.3
        assert encode_linear(off, qp, 4) is None


def test_kept_values_are_stored_in_the_narrowest_exact_dtype():
    """A pruned bf16 checkpoint's kept weights are bf16 values (computed in float32): they are stored in 2 bytes
    each and decode bit for bit; values no narrower dtype holds exactly stay float32."""
    from recoup.artifact.packing import decode_linear, encode_linear

    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g).bfloat16().float()
    w[torch.rand(24, 40, generator=g) < 0.5] = 0
    enc = encode_linear(w, None, None)
    assert enc.meta["encoding"] == "mask_values" and enc.tensors["values"].dtype == torch.bfloat16
    assert torch.equal(decode_linear(enc.meta, enc.tensors, None, torch.float32), w)
    half = (torch.randn(24, 40, generator=g) * 1e-3).half().float()  # float16 values: finer than bf16
    half[w == 0] = 0
    enc = encode_linear(half, None, None)
    assert enc.tensors["values"].dtype == torch.float16
    assert torch.equal(decode_linear(enc.meta, enc.tensors, None, torch.float32), half)
    full = torch.randn(24, 40, generator=g)
    full[w == 0] = 0
    enc = encode_linear(full, None, None)
    assert enc.tensors["values"].dtype == torch.float32
    assert torch.equal(decode_linear(enc.meta, enc.tensors, None, torch.float32), full)
