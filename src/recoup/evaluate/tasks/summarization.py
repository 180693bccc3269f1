"""In-context summarization (LLM-KICK task 4; Jaiswal et al. 2023).

``xsum``: BIG-bench's gem/xsum (1001 BBC articles, one-sentence reference summaries), an optional source
(:mod:`recoup.data.bigbench`; the package index no longer serves it, and no packaged news-summarization set with
reference summaries exists there to replace it).
``cnndm``: CNN/DailyMail stories from a jsonl file (``{question_id, text, category}`` as in LLM-KICK's
89 stories: ``text`` is the instruction and the story; its ``@highlight`` lines are the reference and
are removed from the prompt). Articles fall into LLM-KICK's length buckets (small <= 470 words,
mid 470-790, large >= 790). Greedy decoding through the chat template; ROUGE-1/2/L against the
reference, overall and per bucket (``--option rouge=stemmed``: the ``rouge-score`` package's stemmed
ROUGE-1/2/L/Lsum, the reference one sentence per line for Lsum); with a judge configured, LLM-KICK's four 1-10
judge scores for the reference and the model's summary (a failing judge stops judging; what was judged is kept).
"""

from __future__ import annotations

import logging
from typing import Callable

from recoup.data import bigbench
from recoup.errors import RecoupError
from recoup.evaluate.metrics import require_rouge_score, rouge, rouge_stemmed, summarize
from recoup.evaluate.tasks.common import (
    bool_option,
    file_option,
    int_option,
    make_scorer,
    protocol,
    read_jsonl,
    sample_indices,
)
from recoup.evaluate.tasks.judging import judge_all

log = logging.getLogger(__name__)

TASKS = ("xsum", "cnndm")
XSUM_INSTRUCTION = "Summarize the given article in one sentence.\n\n{article}"
BUCKETS = ("small", "mid", "large")


def source(name: str) -> str:
    if name == "xsum":
        return "BIG-bench 1.0.0 task file gem/xsum/task.json (optional: RECOUP_BIGBENCH_DIR, then recoup setup)"
    return "a jsonl file (--option cnndm_file=PATH)"


ROUGE_METRICS = {
    "plain": "ROUGE-1/2/L F (rouge_score tokenizer, no stemming)",
    "stemmed": "ROUGE-1/2/L/Lsum F from the rouge-score package, use_stemmer=True (Porter); Lsum "
    "sentences = lines (reference: one sentence per line)",
}


def rouge_variant(options: dict) -> str:
    """The ``rouge`` option (plain | stemmed); stemmed needs the rouge-score package."""
    variant = str(options.get("rouge", "plain"))
    if variant not in ROUGE_METRICS:
        raise RecoupError(f"option rouge must be plain or stemmed (got '{variant}')")
    if variant == "stemmed":
        require_rouge_score()
    return variant


def checker(name: str) -> Callable[[dict], None]:
    def check(options: dict) -> None:
        rouge_variant(options)
        if name == "xsum":
            bigbench.require_task("xsum")
        else:
            file_option(options, "cnndm_file", "cnndm")

    return check


def bucket(words: int) -> str:
    """LLM-KICK's length bucket of an article of ``words`` words."""
    return "small" if words <= 470 else "mid" if words < 790 else "large"


def load(name: str, options: dict) -> list[dict]:
    """``{"id", "prompt", "article", "reference", "reference_lines", "bucket"}`` per article
    (``reference_lines``: the reference one sentence per line, for ROUGE-Lsum)."""
    if name == "xsum":
        rows = bigbench.load_task("xsum")["examples"]
        out = []
        for i, r in enumerate(rows):
            target = r["target"] if isinstance(r["target"], str) else r["target"][0]
            out.append(
                {
                    "id": r.get("comment", str(i)),
                    "prompt": XSUM_INSTRUCTION.format(article=r["input"]),
                    "article": r["input"],
                    "reference": target,
                    "reference_lines": target,
                    "bucket": bucket(len(r["input"].split())),
                }
            )
        return out
    out = []
    for row in read_jsonl(file_option(options, "cnndm_file", "cnndm"), ("question_id", "text")):
        story, *highlights = row["text"].split("@highlight")
        article = story.split("\n\n", 1)[1] if "\n\n" in story else story
        out.append(
            {
                "id": str(row["question_id"]),
                "prompt": story.strip(),
                "article": article.strip(),
                "reference": ". ".join(h.strip().rstrip(".") for h in highlights if h.strip()) + ".",
                "reference_lines": "\n".join(h.strip() for h in highlights if h.strip()),
                "bucket": row.get("category") or bucket(len(article.split())),
            }
        )
    return out


def run(name: str, loaded, settings, recovery) -> dict:
    variant = rouge_variant(settings.options)
    examples = load(name, settings.options)
    chosen = [examples[i] for i in sample_indices(len(examples), settings.limit, settings.seed)]
    max_new = int_option(settings.options, "max_new_tokens", 64 if name == "xsum" else 200)
    chat = bool_option(settings.options, "chat", True)
    scorer = make_scorer(loaded, settings, recovery)
    prompts = [scorer.chat_prompt(ex["prompt"]) if chat else ex["prompt"] + "\n\nSummary:" for ex in chosen]
    generated = scorer.generate(prompts, max_new_tokens=max_new, desc=name)
    per: dict[str, list[float]] = {}
    by_bucket: dict[str, list[float]] = {}
    records = []
    for ex, gen in zip(chosen, generated):
        scores = (
            rouge_stemmed(gen.strip(), ex["reference_lines"])
            if variant == "stemmed"
            else rouge(gen.strip(), ex["reference"])
        )
        for key, value in scores.items():
            per.setdefault(key, []).append(value)
            by_bucket.setdefault(f"{key}_{ex['bucket']}", []).append(value)
        records.append({"id": ex["id"], "bucket": ex["bucket"], "generated": gen, **scores})
    result = {**summarize(per), "n": len(chosen), **summarize(dict(sorted(by_bucket.items())))}
    result.update({f"n_{b}": sum(1 for ex in chosen if ex["bucket"] == b) for b in BUCKETS})
    judge = settings.options.get("judge")
    if judge is not None:
        items = [(ex["article"], gen.strip(), ex["reference"]) for ex, gen in zip(chosen, generated)]
        result.update(judge_all(judge, "summary", items, records))
    template = XSUM_INSTRUCTION if name == "xsum" else "{text before @highlight}"
    result["protocol"] = protocol(
        source(name),
        "test" if name == "xsum" else "file",
        template.replace("\n", "\\n"),
        settings,
        len(examples),
        shots=0,
        chat_template=chat,
        max_new_tokens=max_new,
        reference="target" if name == "xsum" else "@highlight lines joined",
        buckets="words: small <= 470 < mid < 790 <= large",
        rouge=variant,
        metric=ROUGE_METRICS[variant],
        judge=judge.describe() if judge is not None else None,
    )
    if name == "xsum":
        result["protocol"]["sha256"] = bigbench.task_sha256(name)
    result["examples"] = records
    log.info("%s: n=%d rougeL=%.4f", name, len(chosen), result.get("rougeL", float("nan")))
    return result
