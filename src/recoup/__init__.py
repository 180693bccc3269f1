"""recoup: compress LLMs, measure what it cost on knowledge-intensive work, win it back.

Public API (re-exported here):

- :func:`load` / :func:`load_model`: any model source (a recoup artifact included) -> :class:`LoadedModel`
- :func:`anatomy`: per-architecture map of layers and linears
- :func:`perplexity`: GPTQ-protocol perplexity
- :class:`Scorer`: batched loglikelihood / greedy generation / rolling likelihood, recovery-aware
- the stage functions in :mod:`recoup.runs.stages`, each taking one typed job (the same object a CLI command
  and a recipe step build): ``compress(CompressJob)``, ``evaluate(EvalJob)``, ``recover(RecoverJob)``;
  the jobs are re-exported here (``recoup.CompressJob.from_flat({...})``)
- :func:`load_recipe` / :func:`run_recipe`: a whole run (compress -> evaluate -> recover -> report) from YAML

Layers (a module imports its own room and rooms below it, never above; the three peers never import
one another; ``tests/test_layers.py`` checks it)::

    commands/, cli, setup, integrations/        the faces: parse arguments into jobs, print
    runs/          stage functions, plan, executors, store, report, compare-recovery
    recipe/        YAML -> validated typed jobs (recipe/jobs.py: CompressJob, EvalJob, RecoverJob)
    compress/  |  recover/  |  evaluate/        peers
    artifact/      save / load / pack / grid / fingerprint of compressed models; load_model of every source
    model/, data/  loading, anatomy, forward, the recovery contract; corpora, windows, task datasets
    errors, config, registry, paths, overrides, version, blocks, memory  the base

Registries (one per kind; a new one is one file + one line): compression methods
(``recoup.compress.METHODS``), recovery methods (``recoup.recover.methods.RECOVERIES``), tasks
(``recoup.evaluate.tasks.TASKS`` and the ``ppl:`` family in ``FAMILIES``).
"""

from __future__ import annotations

import os as _os

from recoup.version import __version__  # noqa: E402

_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from recoup.artifact import LoadedModel, load_model  # noqa: E402
from recoup.errors import RecoupError  # noqa: E402
from recoup.model.anatomy import anatomy  # noqa: E402

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


_STAGES = {"CompressJob": "recoup.recipe.jobs", "EvalJob": "recoup.recipe.jobs", "RecoverJob": "recoup.recipe.jobs"}


def __getattr__(name: str):
    """Lazy attributes: the stage jobs and the Scorer (imported on first use)."""
    if name in _STAGES:
        import importlib

        return getattr(importlib.import_module(_STAGES[name]), name)
    if name == "Scorer":  # the batched, recovery-aware evaluation Scorer
        from recoup.evaluate.scorer import Scorer

        return Scorer
    raise AttributeError(f"module 'recoup' has no attribute '{name}'")


__all__ = [
    "RecoupError",
    "Scorer",
    "CompressJob",
    "EvalJob",
    "RecoverJob",
    "LoadedModel",
    "anatomy",
    "load",
    "load_model",
    "perplexity",
    "load_recipe",
    "run_recipe",
    "__version__",
]
