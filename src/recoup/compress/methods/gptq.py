"""GPTQ (Frantar et al. 2022): blocked OBS quantization with lazy batch updates, group grids,
act-order and static groups; see :func:`recoup.compress.obs.obs_compress`."""

from __future__ import annotations

import dataclasses

import torch

from recoup.compress.config import CompressConfig
from recoup.compress.methods.base import LinearResult, Method
from recoup.compress.obs import OBSOptions, obs_compress
from recoup.compress.stats import HessianStats


@dataclasses.dataclass
class GPTQOptions(OBSOptions):
    """GPTQ's own keys beside the OBS block size and dampening.

    Defaults as llm-compressor's GPTQModifier (``actorder="static"``, ``block_size=128``,
    ``dampening_frac=0.01``): columns in activation order, group grids fitted on the original
    column groups before the reordering, so the artifact's ``g_idx`` stays trivial (no runtime
    reordering in vLLM / GGUF kernels) while the quality gain of act-order is kept."""

    # quantize columns in order of decreasing Hessian diagonal (GPTQ's act-order; --no-act-order: left to right)
    act_order: bool = True
    # with act_order and a group_size: fit each group's grid before reordering (trivial g_idx); no effect per-row
    static_groups: bool = True

    def check(self, config) -> None:
        super().check(config)


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    config: CompressConfig,
    factors: dict | None = None,
    hessian_scale: float = 1.0,
) -> LinearResult:
    """weight (rows, cols), ``hessian_scale * hessian`` (cols, cols) = 2/n X^T X; factors: see
    :func:`obs_compress`."""
    grid = config.grid()
    res = obs_compress(
        weight,
        hessian,
        grid=grid,
        blocksize=config.options.blocksize,
        percdamp=config.options.percdamp,
        act_order=config.options.act_order,
        static_groups=config.options.static_groups,
        factors=factors,
        hessian_scale=hessian_scale,
    )
    return LinearResult(
        weight=res.weight,
        scale=res.scale,
        zero=res.zero,
        g_idx=res.g_idx,
        info={"obs_loss": res.loss, "damp": res.damp},
    )


def _compress(weight: torch.Tensor, stats: HessianStats, config: CompressConfig) -> LinearResult:
    # X^T X as accumulated and 2/n apart: no scaled (cols, cols) copy per linear (0.8 GB for an 8B down_proj)
    return gptq(weight, stats.xtx, config, stats.factors, stats.hessian_scale)


METHOD = Method(
    "gptq",
    "hessian",
    _compress,
    paper="Frantar et al. 2022 (GPTQ)",
    quantize="required",
    options=GPTQOptions,
    one_thread=True,
)
