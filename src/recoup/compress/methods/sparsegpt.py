"""SparseGPT (Frantar & Alistarh 2023): OBS pruning with adaptive per-block masks, N:M, and optional
joint quantization in the same pass (one Hessian); see :func:`recoup.compress.obs.obs_compress`."""

from __future__ import annotations

import dataclasses

import torch

from recoup.compress.config import CompressConfig
from recoup.compress.methods.base import LinearResult, Method
from recoup.compress.obs import OBSOptions, obs_compress
from recoup.compress.stats import HessianStats


@dataclasses.dataclass
class SparseGPTOptions(OBSOptions):
    """The OBS keys plus the order of a layer's groups; by default the order that gave the lower perplexity for
    each kind of pass (docs/guide/compress.md, benchmarks/results/compress_vs_peer/):

    - a pass that only prunes takes every linear's Hessian from the *dense* layer's inputs, the SparseGPT
      reference code's order (IST-DASLab/sparsegpt ``llama.py``; llm-compressor's SparseGPTModifier);
    - a pass that also quantizes (the joint 8x) is true-sequential, GPTQ's order: each group's Hessian from the
      layer with the groups before it compressed.

    ``--true-sequential`` / ``--no-true-sequential`` force either; the manifest records the order used."""

    # None: on when the pass quantizes (GPTQ's order), off when it only prunes (the reference's)
    true_sequential: bool | None = None

    def check(self, config) -> None:
        super().check(config)
        if self.true_sequential is None:
            self.true_sequential = config.bits is not None


def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    config: CompressConfig,
    factors: dict | None = None,
    hessian_scale: float = 1.0,
) -> LinearResult:
    """weight (rows, cols), ``hessian_scale * hessian`` (cols, cols) = 2/n X^T X; factors: see
    :func:`obs_compress`."""
    grid = config.grid() if config.bits else None
    res = obs_compress(
        weight,
        hessian,
        sparsity=config.sparsity or 0.0,
        nm=config.nm,
        grid=grid,
        blocksize=config.options.blocksize,
        percdamp=config.options.percdamp,
        factors=factors,
        hessian_scale=hessian_scale,
    )
    return LinearResult(
        weight=res.weight,
        mask=res.mask,
        scale=res.scale,
        zero=res.zero,
        g_idx=res.g_idx,
        info={"obs_loss": res.loss, "damp": res.damp},
    )


def _compress(weight: torch.Tensor, stats: HessianStats, config: CompressConfig) -> LinearResult:
    # X^T X as accumulated and 2/n apart: no scaled (cols, cols) copy per linear (0.8 GB for an 8B down_proj)
    return sparsegpt(weight, stats.xtx, config, stats.factors, stats.hessian_scale)


METHOD = Method(
    "sparsegpt",
    "hessian",
    _compress,
    paper="Frantar & Alistarh 2023 (SparseGPT)",
    prune="required",
    quantize="optional",
    options=SparseGPTOptions,
    one_thread=True,
)
