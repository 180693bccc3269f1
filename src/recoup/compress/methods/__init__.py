"""The method registry (explicit imports, helpful misses): one line per method file."""

from __future__ import annotations

from recoup.compress.methods import awq, gptq, magnitude, rtn, sparsegpt, wanda
from recoup.compress.methods.base import LinearResult, Method, NoOptions
from recoup.registry import Registry

METHODS: Registry[Method] = Registry("method")
for _mod in (magnitude, wanda, sparsegpt, rtn, gptq, awq):
    METHODS.register(_mod.METHOD.name, _mod.METHOD)

__all__ = ["METHODS", "Method", "LinearResult", "NoOptions"]
