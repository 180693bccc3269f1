"""Packed storage of compressed linears: integer codes bit-packed into uint8, sparsity as a bitmask.

A fake-quantized weight (rows, cols) is ``scale[:, g_idx] * (q - zero[:, g_idx])`` with integer
codes ``q`` in ``[0, 2**bits - 1]`` (see :mod:`recoup.artifact.grid`), so the codes plus the
grid (already in ``quant_params.safetensors``) give the weight back exactly. Encodings of one linear:

- ``codes``: every code, ``bits`` bits each, bit-packed (any 1-8 bits: 3-bit codes take 3 bits,
  not a nibble), little-endian within a byte (the first code in the lowest bits).
- ``mask_codes``: a bitmask of the non-zero weights + the codes of those only (joint sparse +
  quantized: 50% sparse 4-bit is 1 + 0.5 * 4 = 3 bits per weight instead of 4).
- ``mask_values``: a bitmask + the non-zero values (sparse, not quantized), in the narrowest of bfloat16, float16
  and the model dtype that holds every one exactly (pruning a bf16 checkpoint keeps bf16 values: 2 bytes each).

:func:`encode_linear` decodes every candidate and keeps the smallest one that gives the weight
back BIT FOR BIT; a linear none reproduces (e.g. AWQ's preceding linear, rescaled after it was
quantized) or none makes smaller stays dense in ``model.safetensors``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from recoup.blocks import row_blocks
from recoup.errors import RecoupError
from recoup.model.anatomy import anatomy

PACKED_FILE = "packed_weights.safetensors"
ENCODINGS = ("codes", "mask_codes", "mask_values")


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes that ``n`` values of ``bits`` bits take bit-packed."""
    return math.ceil(n * bits / 8)


# values per chunk of pack_bits / unpack_bits (a multiple of 8, so every chunk starts on a byte boundary whatever
# the bit width): their temporaries stay a few chunk sizes, not several copies of an 8B model's largest linear
PACK_CHUNK = 1 << 23


def _pack_chunk(v: torch.Tensor, bits: int) -> torch.Tensor:
    n = v.numel()
    if 8 % bits == 0:  # 1, 2, 4, 8 bits: whole values per byte
        per = 8 // bits
        v = torch.cat([v, v.new_zeros((-n) % per)]).view(-1, per)
        shifts = torch.arange(per, dtype=torch.uint8) * bits
        return (v << shifts).sum(1, dtype=torch.int32).to(torch.uint8)
    flat = ((v[:, None] >> torch.arange(bits, dtype=torch.uint8)) & 1).reshape(-1)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)]).view(-1, 8)
    return (flat << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.int32).to(torch.uint8)


def _unpack_chunk(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    if 8 % bits == 0:
        per = 8 // bits
        out = (packed[:, None] >> (torch.arange(per, dtype=torch.uint8) * bits)) & (2**bits - 1)
        return out.reshape(-1)[:n]
    flat = ((packed[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[: n * bits].view(n, bits)
    return (flat << torch.arange(bits, dtype=torch.uint8)).sum(1, dtype=torch.int32).to(torch.uint8)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-pack ``values`` (any shape, integers in ``[0, 2**bits)``) into a flat uint8 tensor of
    ``ceil(n * bits / 8)`` bytes, the first value in the lowest bits of the first byte."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1-8, got {bits}")
    v = values.reshape(-1)
    n = v.numel()
    out = torch.empty(packed_nbytes(n, bits), dtype=torch.uint8)
    for start in range(0, n, PACK_CHUNK):
        chunk = _pack_chunk(v[start : start + PACK_CHUNK].to(torch.uint8), bits)
        out[start * bits // 8 : start * bits // 8 + chunk.numel()] = chunk
    return out


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: (n,) uint8 values from ``ceil(n * bits / 8)`` packed bytes."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_nbytes(n, bits):
        raise RecoupError(
            f"packed tensor of {tuple(packed.shape)} {packed.dtype} does not hold {n} values of "
            f"{bits} bits; the artifact is corrupted"
        )
    out = torch.empty(n, dtype=torch.uint8)
    for start in range(0, n, PACK_CHUNK):
        m = min(PACK_CHUNK, n - start)
        b0 = start * bits // 8
        out[start : start + m] = _unpack_chunk(packed[b0 : b0 + packed_nbytes(m, bits)], bits, m)
    return out


def grid_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor, maxq: int
) -> torch.Tensor | None:
    """uint8 codes (rows, cols) of ``w`` (rows, cols) on its grids (scale/zero: (rows, groups),
    g_idx: (cols,)), or None when a code falls outside ``[0, maxq]``. Computed a block of rows at a time."""
    g = g_idx.long()
    out = torch.empty(w.shape, dtype=torch.uint8)
    for r in row_blocks(*w.shape):
        q = torch.round(w[r].float() / scale[r].float()[:, g] + zero[r].float()[:, g])
        if q.numel() and (q.min() < 0 or q.max() > maxq):
            return None
        out[r] = q.to(torch.uint8)
    return out


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """float32 ``scale[:, g] * (codes - zero[:, g])``, (rows, cols): the same two float32 operations
    as :meth:`QuantGrid.quantize`, hence the same bits (a block of rows at a time: every value is its own)."""
    g = g_idx.long()
    out = torch.empty(codes.shape, dtype=torch.float32)
    for r in row_blocks(*codes.shape):
        out[r] = scale[r].float().index_select(1, g) * (codes[r].float() - zero[r].float().index_select(1, g))
    return out


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    )


@dataclasses.dataclass
class Encoded:
    """One linear's packed form: ``meta`` goes in the manifest, ``tensors`` (suffix -> uint8 or
    model-dtype tensor) in :data:`PACKED_FILE` under ``<param name>.<suffix>``."""

    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _row_decoder(
    meta: dict[str, Any], tensors: dict[str, torch.Tensor], qparams: dict[str, torch.Tensor] | None
) -> tuple[int, int, Callable[[slice], torch.Tensor]]:
    """(rows, cols, the decoded rows of a slice): the bit-packed parts are unpacked once (uint8 / bool, a
    quarter of a float32 copy); the float work runs per block of rows, so a whole-size float temporary is
    never made."""
    rows, cols = (int(x) for x in meta["shape"])
    enc, n = meta["encoding"], rows * cols
    if enc not in ENCODINGS:
        raise RecoupError(f"unknown packed encoding '{enc}'; is this artifact from a newer recoup?")
    if enc != "codes":
        mask = unpack_bits(tensors["mask"], 1, n).view(rows, cols).view(torch.bool)  # 0/1 bytes: a bool view
        # offsets of each row's first kept value in the values / codes stored for the kept weights only
        counts = [torch.count_nonzero(mask[r], dim=1) for r in row_blocks(rows, cols)]  # (a bool sum is int64-sized)
        starts = [0, *torch.cumsum(torch.cat(counts), 0).tolist()] if counts else [0]
        nnz = starts[-1]

        def kept(stored: torch.Tensor, r: slice, m: torch.Tensor) -> torch.Tensor:
            """The stored kept values (or codes) of rows ``r``, whose mask is ``m``."""
            return stored[starts[r.start] : starts[r.start + m.shape[0]]]

    if enc == "mask_values":
        vals = tensors["values"]
        if vals.numel() != nnz:
            raise RecoupError("packed values do not match their mask; the artifact is corrupted")

        def block(r: slice) -> torch.Tensor:
            m = mask[r]
            return torch.zeros(m.shape, dtype=vals.dtype).masked_scatter_(m, kept(vals, r, m))

        return rows, cols, block
    if qparams is None or not {"scale", "zero", "g_idx"} <= qparams.keys():
        raise RecoupError("a linear is stored as codes but its grid is not in the quantization parameters")
    bits = int(meta["bits"])
    scale, zero, g = qparams["scale"], qparams["zero"], qparams["g_idx"].long()
    if enc == "codes":
        codes = unpack_bits(tensors["codes"], bits, n).view(rows, cols)
        return rows, cols, lambda r: dequantize(codes[r], scale[r], zero[r], g)
    codes = unpack_bits(tensors["codes"], bits, nnz)

    def masked(r: slice) -> torch.Tensor:
        m = mask[r]
        z = zero[r].float().index_select(1, g)  # pruned weights take the code of 0.0: scale * 0 = +0
        full = z.clone().masked_scatter_(m, kept(codes, r, m).float())
        return scale[r].float().index_select(1, g) * (full - z)

    return rows, cols, masked


def decode_linear(
    meta: dict[str, Any], tensors: dict[str, torch.Tensor], qparams: dict[str, torch.Tensor] | None, dtype: torch.dtype
) -> torch.Tensor:
    """The weight (rows, cols) in ``dtype`` from an :class:`Encoded`'s ``meta`` and ``tensors``."""
    try:
        rows, cols, block = _row_decoder(meta, tensors, qparams)
        out = torch.empty(rows, cols, dtype=dtype)
        for r in row_blocks(rows, cols):
            out[r] = block(r)
        return out
    except RecoupError:
        raise
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as exc:
        raise RecoupError(
            f"a packed weight cannot be decoded ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "the artifact is corrupted"
        ) from None


def _decodes_to(enc: Encoded, qparams: dict[str, torch.Tensor] | None, w: torch.Tensor) -> bool:
    """Whether ``enc`` decodes to exactly ``w``, bit for bit, compared a block of rows at a time."""
    rows, cols, block = _row_decoder(enc.meta, enc.tensors, qparams)
    return (rows, cols) == tuple(w.shape) and all(
        _same_bits(block(r).to(w.dtype), w[r]) for r in row_blocks(rows, cols)
    )


def _kept(t: torch.Tensor, keep: torch.Tensor, nnz: int) -> torch.Tensor:
    """``t[keep]`` (row-major order), gathered a block of rows at a time: boolean indexing of a whole matrix
    makes an int64 index of every kept entry (8 bytes each, twice a float32 copy's size)."""
    out = torch.empty(nnz, dtype=t.dtype)
    at = 0
    for r in row_blocks(*t.shape):
        part = t[r][keep[r]]
        out[at : at + part.numel()] = part
        at += part.numel()
    return out


def encode_linear(w: torch.Tensor, qparams: dict[str, torch.Tensor] | None, bits: int | None) -> Encoded | None:
    """The smallest packed form of ``w`` (rows, cols, model dtype) that decodes to exactly ``w``
    and is smaller than ``w`` dense, or None (keep it dense). ``qparams``: its grid, if quantized."""
    rows, cols = w.shape
    n = rows * cols
    base = {"shape": [rows, cols]}
    nonzero = w != 0
    nnz = int(torch.count_nonzero(nonzero))
    # (size in bytes, builder) of each candidate: sizes are known before packing, so only the candidates that
    # can win are packed (on a dense quantized linear the mask form is never built); ties keep this order
    candidates: list[tuple[int, Callable[[], Encoded]]] = []
    if qparams is not None and bits:
        codes = grid_codes(w, qparams["scale"], qparams["zero"], qparams["g_idx"], 2**bits - 1)
        if codes is not None:
            candidates.append(
                (
                    packed_nbytes(n, bits),
                    lambda: Encoded({**base, "encoding": "codes", "bits": bits}, {"codes": pack_bits(codes, bits)}),
                )
            )
            candidates.append(
                (
                    packed_nbytes(n, 1) + packed_nbytes(nnz, bits),
                    lambda: Encoded(
                        {**base, "encoding": "mask_codes", "bits": bits},
                        {"mask": pack_bits(nonzero, 1), "codes": pack_bits(_kept(codes, nonzero, nnz), bits)},
                    ),
                )
            )
    elif nnz < n:
        candidates.append(
            (
                packed_nbytes(n, 1) + nnz * w.element_size(),
                lambda: Encoded(
                    {**base, "encoding": "mask_values"},
                    {"mask": pack_bits(nonzero, 1), "values": _narrowest(_kept(w, nonzero, nnz))},
                ),
            )
        )
    dense_bytes = n * w.element_size()
    for size, build in sorted(candidates, key=lambda c: c[0]):
        if size >= dense_bytes:
            break
        enc = build()
        if _decodes_to(enc, qparams, w):
            return enc
        del enc
    return None


def _narrowest(values: torch.Tensor) -> torch.Tensor:
    """``values`` in the narrowest of bfloat16 / float16 that holds every one exactly, else as they are: the kept
    weights of a pruned bf16 checkpoint are bf16 values computed in float32, and 2 bytes each hold them."""
    for dtype in (torch.bfloat16, torch.float16):
        if torch.empty(0, dtype=dtype).element_size() < values.element_size():
            narrow = values.to(dtype)
            if torch.equal(narrow.to(values.dtype), values):
                return narrow
            del narrow
    return values


@torch.no_grad()
def pack_model(
    model: nn.Module, names: list[str], qparams: dict[str, dict[str, torch.Tensor]], bits: int | None
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Encode the linears ``names`` (dotted module names) of ``model``.

    Returns (tensors for :data:`PACKED_FILE`, {parameter name: meta} for the manifest); linears
    left out of the second keep their dense weight in ``model.safetensors``.
    """
    anat = anatomy(model)
    modules = dict(model.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    metas: dict[str, dict[str, Any]] = {}
    for name in tqdm(names, desc="pack weights", unit="linear"):
        w = anat.weight_matrix(modules[name]).detach().cpu()
        enc = encode_linear(w, qparams.get(name), bits)
        if enc is None:
            continue
        key = f"{name}.weight"
        metas[key] = {"linear": name, **enc.meta}
        tensors.update({f"{key}.{suffix}": t for suffix, t in enc.tensors.items()})
    return tensors, metas


@torch.no_grad()
def unpack_into(
    model: nn.Module,
    metas: dict[str, dict[str, Any]],
    tensors: dict[str, torch.Tensor],
    qparams: dict[str, dict[str, torch.Tensor]],
) -> None:
    """Write the decoded weight of every packed parameter in ``metas`` into ``model`` (in place)."""
    conv1d = anatomy(model).spec.conv1d
    params = dict(model.named_parameters())
    for key, meta in tqdm(metas.items(), desc="unpack weights", unit="linear"):
        p = params.get(key)
        if p is None:
            raise RecoupError(f"the artifact packs '{key}', which this model does not have; the artifact is corrupted")
        parts = {s: tensors[f"{key}.{s}"] for s in ("codes", "mask", "values") if f"{key}.{s}" in tensors}
        w = decode_linear(meta, parts, qparams.get(meta.get("linear", "")), p.dtype)
        w = w.t() if conv1d else w
        if w.shape != p.shape:
            raise RecoupError(
                f"packed '{key}' is {tuple(w.shape)}, the model's is {tuple(p.shape)}; the artifact is corrupted"
            )
        p.data.copy_(w.to(p.device))
