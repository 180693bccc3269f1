"""The perplexity task family: ``ppl:CORPUS`` or ``ppl:CORPUS:SPLIT`` (default split test).

A parametric family: the registry hands any name with the ``ppl:`` prefix to :func:`spec`, which parses
it once; nothing else in recoup looks at the prefix. The corpus is any of
:data:`recoup.data.corpora.CORPORA` or a .txt/.jsonl file; the protocol is GPTQ's
(:mod:`recoup.evaluate.perplexity`), windows of the eval ``seqlen``, ``limit`` windows at most.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from recoup.errors import RecoupError
from recoup.evaluate.tasks.common import TaskSpec

PREFIX = "ppl"


def parse(name: str) -> tuple[str, str]:
    """``ppl:ptb`` -> ("ptb", "test"); ``ppl:wiki:valid`` -> ("wiki", "valid")."""
    parts = name.split(":")
    if parts[0] != PREFIX or len(parts) not in (2, 3) or not parts[1] or (len(parts) == 3 and not parts[2]):
        raise RecoupError(f"bad perplexity task '{name}'; write ppl:CORPUS or ppl:CORPUS:SPLIT (e.g. ppl:ptb)")
    return parts[1], parts[2] if len(parts) == 3 else "test"


def check_corpus(corpus: str, what: str = "corpus") -> None:
    """One clear line for an unknown corpus name, a missing file, or a file that is not UTF-8 text (before any
    model loads)."""
    from recoup.data.corpora import CORPORA, check_text_file

    if corpus in CORPORA:
        return
    if Path(corpus).expanduser().is_file():
        check_text_file(corpus, what)
        return
    if "/" in corpus or "." in corpus:
        raise RecoupError(f"{what}: file not found: '{corpus}'")
    close = difflib.get_close_matches(corpus, CORPORA, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise RecoupError(
        f"{what}: unknown corpus '{corpus}'{hint} known: {', '.join(CORPORA)} or a path to a .txt/.jsonl file"
    )


def run(name: str, loaded, settings, recovery) -> dict:
    """GPTQ-protocol perplexity of ``loaded`` (recovery already attached by the runner)."""
    from recoup.evaluate.perplexity import perplexity

    corpus, split = parse(name)
    res = perplexity(
        loaded.model,
        loaded.tokenizer,
        corpus,
        split,
        settings.seqlen,
        settings.limit,
        batch_size=1,
        recovery=recovery,
        attached=True,
        bos=settings.bos,
    )
    return {**res.to_dict(), "primary": "ppl"}


def spec(name: str) -> TaskSpec:
    """The :class:`TaskSpec` of one ``ppl:...`` name (parsed and checked here)."""
    corpus, _ = parse(name)
    return TaskSpec(
        name,
        "perplexity",
        run,
        corpus,
        check=lambda options: check_corpus(corpus, f"task {name}"),
        lower_is_better=True,
    )
