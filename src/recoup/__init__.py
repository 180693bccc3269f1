"""recoup: compress LLMs, measure what it cost on knowledge-intensive work, win it back.

Public API (re-exported here):

- :func:`load` / :func:`load_model`: any model source -> :class:`LoadedModel`
- :func:`anatomy`: per-architecture map of layers and linears
- :func:`perplexity`: GPTQ-protocol perplexity
- :class:`Scorer`: batched loglikelihood / greedy generation / rolling likelihood, recovery-aware
- :func:`compress`: compress a loaded model in place (``recoup.compress(loaded, config, calibration)``)
"""

from __future__ import annotations

__version__ = "0.1.0"

import os as _os

_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from recoup.errors import RecoupError  # noqa: E402
from recoup.model.anatomy import anatomy  # noqa: E402
from recoup.model.load import LoadedModel, load_model  # noqa: E402

load = load_model


def perplexity(*args, **kwargs):
    """See :func:`recoup.evaluate.perplexity.perplexity`."""
    from recoup.evaluate.perplexity import perplexity as _ppl

    return _ppl(*args, **kwargs)


def __getattr__(name: str):
    """Lazy ``recoup.compress``: the package is callable as :func:`recoup.compress.engine.compress`."""
    if name == "compress":
        import importlib

        return importlib.import_module("recoup.compress")
    if name == "Scorer":  # the batched, recovery-aware evaluation Scorer
        from recoup.evaluate.scorer import Scorer

        return Scorer
    raise AttributeError(f"module 'recoup' has no attribute '{name}'")


__all__ = ["RecoupError", "Scorer", "compress", "LoadedModel", "anatomy", "load", "load_model", "perplexity", "__version__"]
