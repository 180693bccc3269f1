"""Compression: one sequential engine, six methods (magnitude, wanda, sparsegpt, rtn, gptq, awq),
N:M, joint sparse + quantized.

    from recoup.compress import CompressConfig, compress
    report = compress(loaded, CompressConfig.from_dict({"method": "sparsegpt", "sparsity": 0.5, "bits": 4,
                                                          "group_size": 64}), calibration)
    # model on CPU, one decoder layer at a time on the GPU:
    report = compress(loaded, config, calibration, device="cuda")

A new method: one file with ``METHOD = Method(...)`` (its statistics, math and own keys) and one line in
:mod:`recoup.compress.methods`; ``METHODS.register`` adds one from outside the package.
"""

from __future__ import annotations

from recoup.artifact.report import CompressReport, LinearRecord
from recoup.compress.config import CompressConfig, MethodOptions
from recoup.compress.engine import compress
from recoup.compress.methods import METHODS, Method

__all__ = ["CompressConfig", "CompressReport", "LinearRecord", "METHODS", "Method", "MethodOptions", "compress"]
