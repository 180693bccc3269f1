"""What a compression method is: the statistics it needs, its own config keys and pure tensor math on one weight.

A new method is one file defining ``METHOD = Method(...)`` plus one line in :mod:`recoup.compress.methods`
(or ``METHODS.register(...)`` from your own code): the CLI, recipes and Python pick it up from the registry.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from recoup.compress.config import MethodOptions


@dataclasses.dataclass
class LinearResult:
    """A compressed weight (rows, cols) float32 and what the artifact records about it."""

    weight: torch.Tensor
    mask: torch.Tensor | None = None  # (rows, cols) bool, True = pruned
    scale: torch.Tensor | None = None  # (rows, groups) grid scale
    zero: torch.Tensor | None = None  # (rows, groups) grid zero point (integer code of 0.0)
    g_idx: torch.Tensor | None = None  # (cols,) int32 group of each column
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class NoOptions(MethodOptions):
    """A method with no keys of its own."""


@dataclasses.dataclass(frozen=True)
class Method:
    """``stats``: none | hessian | act_norm | act_sample | block_io. ``compress_linear(weight, stats, config)``
    is pure math on a (rows, cols) float32 weight; ``prepare_group`` (AWQ) may rescale a group of
    linears and fold the inverse scale into the preceding op before they are compressed;
    ``block(model_type, group)`` names the module (relative to the decoder layer) whose calls
    ``block_io`` statistics record for that group (AWQ's block-output loss), or None.
    ``prune`` / ``quantize``: required | optional | never (what the shared keys must say);
    ``options``: the method's own config keys (a :class:`MethodOptions` subclass); ``one_thread``:
    ``compress_linear`` runs on one thread and writes nothing shared, so the engine compresses a layer's
    independent linears side by side (:mod:`recoup.compress.parallel`)."""

    name: str
    stats: str
    compress_linear: Callable[..., LinearResult]
    prepare_group: Callable[..., dict] | None = None
    paper: str = ""
    prune: str = "never"
    quantize: str = "never"
    options: type[MethodOptions] = NoOptions
    block: Callable[[str, tuple[str, ...]], str | None] | None = None
    one_thread: bool = False
