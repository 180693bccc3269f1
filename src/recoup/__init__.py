"""recoup: compress LLMs, measure what it cost on knowledge-intensive work, win it back.

Public API (re-exported here):

- :func:`load` / :func:`load_model`: any model source -> :class:`LoadedModel`
- :func:`anatomy`: per-architecture map of layers and linears
- :func:`perplexity`: GPTQ-protocol perplexity
- :class:`Scorer`: batched loglikelihood / greedy generation / rolling likelihood, recovery-aware
- :func:`load_recipe` / :func:`run_recipe`: a whole run (compress -> evaluate -> recover -> report) from YAML
- :func:`compress`: compress a loaded model in place (``recoup.compress(loaded, config, calibration)``)
"""

from __future__ import annotations

from recoup.version import __version__  # noqa: E402

import os as _os

_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from recoup.errors import RecoupError  # noqa: E402
from recoup.model.anatomy import anatomy  # noqa: E402
from recoup.artifact import LoadedModel, load_model  # noqa: E402

load = load_model


def perplexity(*args, **kwargs):
    """See :func:`recoup.evaluate.perplexity.perplexity`."""
    from recoup.evaluate.perplexity import perplexity as _ppl

    return _ppl(*args, **kwargs)


def load_recipe(*args, **kwargs):
    """See :func:`recoup.recipe.load_recipe` (a YAML run recipe, validated; ``None`` = the shipped default)."""
    from recoup.recipe import load_recipe as _load_recipe

    return _load_recipe(*args, **kwargs)


def run_recipe(*args, **kwargs):
    """See :func:`recoup.runs.run.run_recipe` (run a recipe with caching and resume, record it, report it)."""
    from recoup.runs.run import run_recipe as _run_recipe

    return _run_recipe(*args, **kwargs)


def __getattr__(name: str):
    """Lazy ``recoup.compress``: the package is callable as :func:`recoup.compress.engine.compress`."""
    if name == "compress":
        import importlib

        return importlib.import_module("recoup.compress")
    if name == "Scorer":  # the batched, recovery-aware evaluation Scorer
        from recoup.evaluate.scorer import Scorer

        return Scorer
    raise AttributeError(f"module 'recoup' has no attribute '{name}'")


__all__ = ["RecoupError", "Scorer", "compress", "LoadedModel", "anatomy", "load", "load_model", "perplexity",
           "load_recipe", "run_recipe", "__version__"]
