"""GPTQ (Frantar et al. 2022): blocked OBS quantization with lazy batch updates, group grids,
act-order and static groups; see :func:`recoup.compress.obs.obs_compress`."""

from __future__ import annotations

import dataclasses

import torch

from recoup.compress.config import CompressConfig
from recoup.compress.methods.base import LinearResult, Method
from recoup.compress.obs import OBSOptions, obs_compress
from recoup.artifact.grid import QuantGrid
from recoup.compress.stats import HessianStats
from recoup.config import check


@dataclasses.dataclass
class GPTQOptions(OBSOptions):
    """GPTQ's own keys beside the OBS block size and dampening."""

    act_order: bool = False  # quantize columns in order of decreasing Hessian diagonal
    static_groups: bool = False  # with act_order: fix group grids before reordering

    def check(self, config) -> None:
        super().check(config)
        if self.static_groups:
            check(config.group_size is not None, "static_groups needs a group_size")


def gptq(weight: torch.Tensor, hessian: torch.Tensor, config: CompressConfig) -> LinearResult:
    """weight (rows, cols), hessian (cols, cols) = 2/n X^T X."""
    grid = QuantGrid(config.bits, config.sym, config.group_size)
    res = obs_compress(weight, hessian, grid=grid, blocksize=config.options.blocksize,
                       percdamp=config.options.percdamp, act_order=config.options.act_order,
                       static_groups=config.options.static_groups)
    return LinearResult(weight=res.weight, scale=res.scale, zero=res.zero, g_idx=res.g_idx,
                        info={"obs_loss": res.loss, "damp": res.damp})


def _compress(weight: torch.Tensor, stats: HessianStats, config: CompressConfig) -> LinearResult:
    return gptq(weight, stats.hessian(), config)


METHOD = Method("gptq", "hessian", _compress, paper="Frantar et al. 2022 (GPTQ)", quantize="required",
                options=GPTQOptions)
