"""What every export format shares: the stage config, the registry, the artifact as an exporter sees it,
and the integer codes of a quantized linear read back from its fake-quantized weight.

A recoup artifact stores each quantized linear as ``scale[:, g_idx] * (q - zero[:, g_idx])`` (see
:mod:`recoup.artifact.grid`): integer codes ``q`` in ``[0, 2**bits - 1]``, a float32 scale and an integer
zero point per (row, group). A destination format that stores the same codes and scales holds the
same weights; :func:`linear_codes` recovers the codes and proves that, bit for bit, before a format uses them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from recoup.artifact.packing import dequantize, grid_codes
from recoup.config import Config, check
from recoup.registry import Registry

DTYPES = ("float32", "float16", "bfloat16")
GGUF_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0")
SIDE_JSON = "recoup_export.json"


@dataclasses.dataclass
class ExportConfig(Config):
    """``recoup export``: ``source`` (a recoup artifact directory) written as ``format`` into ``out``.

    dtype: of the unquantized tensors and the scales (default: the artifact's own dtype).
    recovery: a saved recovery directory written beside the export as ``out/recovery`` with
    ``base_model_name_or_path`` pointing at ``out``. merge: merge that LoRA into the weights
    (``--format hf`` only: it densifies a sparse model and moves a quantized one off its grid).
    gguf_type: the GGUF type of the quantized linears (default: the one the artifact's grid maps onto).
    """

    source: str = ""
    format: str = ""
    out: str = ""
    dtype: str | None = None
    recovery: str | None = None
    merge: bool = False
    gguf_type: str | None = None

    def __post_init__(self) -> None:
        check(bool(self.source), "export needs a source artifact")
        check(bool(self.out), "export needs --out")
        FORMATS.get(self.format)  # an unknown format is one line naming the known ones
        check(
            self.dtype is None or self.dtype in DTYPES,
            f"--dtype must be one of {', '.join(DTYPES)} (got '{self.dtype}')",
        )
        if self.gguf_type is not None:
            check(self.format == "gguf", "--gguf-type applies to --format gguf only")
            check(
                self.gguf_type in GGUF_TYPES, f"unknown --gguf-type '{self.gguf_type}'; known: {', '.join(GGUF_TYPES)}"
            )
        if self.merge:
            check(self.recovery is not None, "--merge needs --recovery DIR (the LoRA to merge)")
            check(
                self.format == "hf",
                "--merge writes a dense model: only --format hf holds it (merging a LoRA "
                "into a sparse or quantized base would densify it); drop --merge to export "
                "the adapter beside the model",
            )


@dataclasses.dataclass
class ArtifactInfo:
    """An artifact as read before any model is loaded: its manifest and quantization grids."""

    path: Path
    manifest: dict[str, Any]
    qparams: dict[str, dict[str, torch.Tensor]]  # linear name -> scale/zero (rows, groups), g_idx (cols,)

    @property
    def recipe(self) -> dict[str, Any]:
        return self.manifest.get("recipe") or {}

    @property
    def bits(self) -> int | None:
        return self.recipe.get("bits")

    @property
    def sym(self) -> bool:
        return bool(self.recipe.get("sym", True))

    @property
    def group_size(self) -> int | None:
        g = self.recipe.get("group_size")
        return None if g in (None, -1) else int(g)

    @property
    def model_type(self) -> str:
        return str(self.manifest.get("model_type"))

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {r["name"]: tuple(r["shape"]) for r in self.manifest.get("layers") or []}

    def describe_grid(self) -> str:
        if not self.bits:
            return "no quantization grid"
        return f"{self.bits}-bit {'sym' if self.sym else 'asym'} " + (
            f"groups of {self.group_size}" if self.group_size else "per-row"
        )


def natural_groups(info: ArtifactInfo) -> str | None:
    """None when every quantized linear's groups are consecutive runs of ``group_size`` columns with no
    ragged last group (what compressed-tensors' group / channel strategy holds); else why not."""
    shapes = info.shapes()
    for name, q in info.qparams.items():
        cols = int(q["g_idx"].numel())
        g = info.group_size or cols
        if cols % g:
            return (
                f"'{name}' has {cols} columns, not a multiple of the group size {g} (a ragged last group); "
                f"recompress with a --group-size that divides {cols}"
            )
        if not torch.equal(q["g_idx"].long(), torch.arange(cols) // g):
            return (
                f"'{name}' has act-order groups (columns not in group order); recompress with "
                "--static-groups or without --act-order"
            )
        if name in shapes and shapes[name][1] != cols:
            return f"'{name}': its grid covers {cols} columns but the linear has {shapes[name][1]}"
    return None


class Exporter(Protocol):
    """One destination format: ``plan`` validates (cheap, before the model loads) and returns what
    ``write`` needs; ``write`` puts the files into an empty directory and returns a summary."""

    name: str
    loader: str  # what loads the result, for the side JSON and the CLI line

    def plan(self, info: ArtifactInfo, config: ExportConfig) -> dict[str, Any]: ...

    def write(
        self,
        model: nn.Module,
        tokenizer: Any,
        info: ArtifactInfo,
        plan: dict[str, Any],
        config: ExportConfig,
        out: Path,
    ) -> dict[str, Any]: ...


FORMATS: Registry[Exporter] = Registry("export format")


@dataclasses.dataclass
class LinearCodes:
    """A quantized linear as integer codes: ``codes`` (rows, cols) uint8 in ``[0, 2**bits)``, ``scale``
    (rows, groups) float32, ``zero`` (rows, groups) float32 integer values; weight = scale * (codes - zero)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


@torch.no_grad()
def linear_codes(weight: torch.Tensor, q: dict[str, torch.Tensor], bits: int) -> LinearCodes | None:
    """The codes of ``weight`` (rows, cols) on its grid ``q``, or None when the weight is not exactly on
    it (e.g. AWQ's preceding linear, rescaled after it was quantized): such a linear stays unquantized."""
    w = weight.detach().float().cpu()
    codes = grid_codes(w, q["scale"], q["zero"], q["g_idx"], 2**bits - 1)
    if codes is None or not torch.equal(dequantize(codes, q["scale"], q["zero"], q["g_idx"]), w):
        return None
    return LinearCodes(codes, q["scale"].float(), q["zero"].float())


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` of ``model`` by dotted name (what a ``targets: [Linear]`` scheme matches)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def dtype_of(info: ArtifactInfo, config: ExportConfig) -> torch.dtype:
    name = config.dtype or str(info.manifest.get("dtype") or "float32")
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(name, torch.float32)
