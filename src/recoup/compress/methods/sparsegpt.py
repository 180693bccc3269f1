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
    """The OBS keys with the SparseGPT reference code's order: every linear of a decoder layer is pruned from
    the Hessian of the *dense* layer's inputs (IST-DASLab/sparsegpt ``llama.py``, llm-compressor's
    SparseGPTModifier), not true-sequentially (measured on the bundled model, 50%, 128 x 512 PTB: PTB 69.74
    against 70.99 true-sequential). ``--true-sequential`` takes GPTQ's order."""

    true_sequential: bool = False  # off (the reference's order): every group's Hessian from the dense layer's inputs


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, config: CompressConfig) -> LinearResult:
    """weight (rows, cols), hessian (cols, cols) = 2/n X^T X."""
    grid = config.grid() if config.bits else None
    res = obs_compress(weight, hessian, sparsity=config.sparsity or 0.0, nm=config.nm, grid=grid,
                       blocksize=config.options.blocksize, percdamp=config.options.percdamp)
    return LinearResult(weight=res.weight, mask=res.mask, scale=res.scale, zero=res.zero, g_idx=res.g_idx,
                        info={"obs_loss": res.loss, "damp": res.damp})


def _compress(weight: torch.Tensor, stats: HessianStats, config: CompressConfig) -> LinearResult:
    return sparsegpt(weight, stats.hessian(), config)


METHOD = Method("sparsegpt", "hessian", _compress, paper="Frantar & Alistarh 2023 (SparseGPT)", prune="required",
                quantize="optional", options=SparseGPTOptions)
