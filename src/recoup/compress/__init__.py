"""Compression: one sequential engine, six methods (magnitude, wanda, sparsegpt, rtn, gptq, awq),
N:M, joint sparse + quantized, artifacts.

    from recoup.compress import CompressConfig, compress
    report = compress(loaded, CompressConfig.from_dict({"method": "sparsegpt", "sparsity": 0.5, "bits": 4,
                                                          "group_size": 64}), calibration)
    # model on CPU, one decoder layer at a time on the GPU:
    report = compress(loaded, config, calibration, device="cuda")
"""

from __future__ import annotations

from recoup.compress.config import METHOD_NAMES, CompressConfig
from recoup.compress.engine import compress
from recoup.artifact.report import CompressReport, LinearRecord

__all__ = ["CompressConfig", "CompressReport", "LinearRecord", "METHOD_NAMES", "compress"]


class _CallableModule(__import__("types").ModuleType):
    """``recoup.compress(loaded, config, calibration)`` calls :func:`compress` while ``recoup.artifact.store``
    stays reachable: the package and the function share one name."""

    def __call__(self, loaded, config, calibration=None, **kwargs) -> CompressReport:
        return compress(loaded, config, calibration, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallableModule
