"""LLM-as-judge with LLM-KICK's pairwise protocol (Jaiswal et al. 2023, after Vicuna/FastChat's judge).

The judge sees a reference answer ("Assistant 1") and the evaluated model's answer ("Assistant 2")
and scores both: one overall 1-10 score each for an instruction, four 1-10 scores each (coherence,
consistency, fluency, relevance) for a summary. Without a reference it grades the one answer.
Parsing is tolerant (the first line holding enough numbers in range); an unparsable reply is asked
again up to ``retries`` times; every verdict keeps the judge's raw text. A judge is any
OpenAI-compatible chat endpoint (:class:`HttpJudge`; the key is read from an environment variable and
never logged) or a local Hugging Face model (:class:`LocalJudge`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
import urllib.error
import urllib.request
from typing import Any, Protocol

from recoup.errors import RecoupError
from recoup.safeio import redact, secret_env

log = logging.getLogger(__name__)

SUMMARY_CRITERIA = ("coherence", "consistency", "fluency", "relevance")
SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."

PAIR = """[Question]
{question}

[The Start of Assistant 1's Answer]
{reference}

[The End of Assistant 1's Answer]

[The Start of Assistant 2's Answer]
{answer}

[The End of Assistant 2's Answer]

[System]
We would like to request your feedback on the performance of two AI assistants in response to the user question displayed above.
Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each assistant receives an overall score on a scale of 1 to 10, where a higher score indicates better overall performance.
Please first output a single line containing only two values indicating the scores for Assistant 1 and 2, respectively. The two scores are separated by a space. In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any potential bias and ensuring that the order in which the responses were presented does not affect your judgment."""

SINGLE = """[Question]
{question}

[The Start of the Assistant's Answer]
{answer}

[The End of the Assistant's Answer]

[System]
Please rate the helpfulness, relevance, accuracy and level of detail of the response on a scale of 1 to 10, where a higher score indicates better overall performance.
Please first output a single line containing only the score. In the subsequent line, please provide a comprehensive explanation of your evaluation."""

SUMMARY = """[Article]
{question}

[The Start of Summary 1]
{reference}

[The End of Summary 1]

[The Start of Summary 2]
{answer}

[The End of Summary 2]

[System]
We would like to request your feedback on the two summaries of the article above.
Rate each summary for coherence, consistency, fluency and relevance, each on a scale of 1 to 10, where a higher score is better.
Please first output exactly two lines: the first line holds the four scores (coherence consistency fluency relevance) of Summary 1, the second line the four scores of Summary 2, separated by spaces. Then provide a comprehensive explanation of your evaluation, avoiding any potential bias and ensuring that the order in which the summaries were presented does not affect your judgment."""


class JudgeError(RecoupError):
    """The judge could not be reached or never gave a parsable verdict."""


class ChatBackend(Protocol):
    name: str

    def chat(self, system: str, user: str) -> str: ...


@dataclasses.dataclass
class Verdict:
    """Scores for the reference (empty without one) and the model, and the judge's raw reply."""

    reference: list[float]
    model: list[float]
    raw: str
    attempts: int


_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def parse_scores(text: str, per_answer: int, answers: int) -> tuple[list[float], ...] | None:
    """``answers`` lists of ``per_answer`` scores in [0, 10] from a judge reply, or None.

    Looks for the first line(s) holding numbers: one line with all ``per_answer * answers`` numbers, or
    ``answers`` consecutive lines with ``per_answer`` numbers each (extra words like "Assistant 1:" are
    ignored).
    """
    rows = []
    for line in text.splitlines():
        cleaned = re.sub(r"(Assistant|Summary)\s*[12]\s*[:：]?", " ", line, flags=re.I)
        nums = [float(x) for x in _NUMBER.findall(cleaned.replace(",", " ").replace("/10", " "))]
        nums = [x for x in nums if 0 <= x <= 10]
        if nums:
            rows.append(nums)
    need = per_answer * answers
    for i, nums in enumerate(rows):
        if len(nums) == need:
            return tuple(nums[k * per_answer : (k + 1) * per_answer] for k in range(answers))
        if (
            len(nums) == per_answer
            and i + answers <= len(rows)
            and all(len(r) == per_answer for r in rows[i : i + answers])
        ):
            return tuple(rows[i + k] for k in range(answers))
    return None


class HttpJudge:
    """An OpenAI-compatible ``/chat/completions`` endpoint (temperature 0)."""

    def __init__(
        self, url: str, model: str, key_env: str | None = "OPENAI_API_KEY", timeout: float = 60.0, max_tokens: int = 512
    ) -> None:
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model, self.key_env, self.timeout, self.max_tokens = model, key_env, timeout, max_tokens
        self.name = f"{model} @ {self.url}"

    def chat(self, system: str, user: str) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "temperature": 0,
                "max_tokens": self.max_tokens,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            }
        )
        headers = {"Content-Type": "application/json"}
        key = secret_env(self.key_env) if self.key_env else None  # registered: redacted from logs/JSON/errors
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url, data=body.encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as exc:
            raise JudgeError(redact(f"judge {self.url} answered HTTP {exc.code} ({exc.reason})")) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError) or isinstance(exc, TimeoutError):  # slow, not gone
                raise JudgeError(
                    redact(f"judge {self.url} sent no reply within {self.timeout:g} s (raise --judge-timeout)")
                ) from None
            raise JudgeError(redact(f"judge {self.url} is unreachable ({reason})")) from None
        try:
            return redact(json.loads(payload)["choices"][0]["message"]["content"])
        except (json.JSONDecodeError, KeyError, IndexError, TypeError, UnicodeDecodeError):
            raise JudgeError(
                redact(f"judge {self.url} sent a reply that is not an OpenAI chat completion: {payload[:120]!r}")
            ) from None


class LocalJudge:
    """A local causal LM (any recoup model source) answering through its chat template, greedily."""

    def __init__(self, loaded: Any, max_new_tokens: int = 256) -> None:
        from recoup.evaluate.scorer import Scorer

        self.scorer = Scorer(loaded.model, loaded.tokenizer, batch_size=1, progress=False)
        self.max_new_tokens = max_new_tokens
        self.name = f"local {loaded.source}"

    def chat(self, system: str, user: str) -> str:
        tok = self.scorer.tokenizer
        if getattr(tok, "chat_template", None):
            try:
                prompt = tok.apply_chat_template(
                    [{"role": "system", "content": system}, {"role": "user", "content": user}],
                    tokenize=False,
                    add_generation_prompt=True,
                )
            except Exception:  # some templates reject a system turn  # noqa: BLE001
                prompt = self.scorer.chat_prompt(f"{system}\n\n{user}")
        else:
            prompt = f"{system}\n\n{user}\n"
        return self.scorer.generate([prompt], max_new_tokens=self.max_new_tokens)[0]


class Judge:
    """LLM-KICK's judging protocol over a chat backend, with retries on unparsable replies."""

    def __init__(self, backend: ChatBackend, retries: int = 3, backoff_s: float = 0.5) -> None:
        if retries < 1:
            raise RecoupError(f"judge retries must be at least 1 (got {retries})")
        self.backend, self.retries, self.backoff_s = backend, retries, backoff_s

    def describe(self) -> dict:
        return {"judge": self.backend.name, "retries": self.retries}

    def _ask(self, prompt: str, per_answer: int, answers: int) -> Verdict:
        raw = ""
        last_error: JudgeError | None = None
        for attempt in range(1, self.retries + 1):
            try:
                raw = self.backend.chat(SYSTEM, prompt)
            except JudgeError as exc:
                last_error = exc
                log.warning("judge attempt %d/%d failed: %s", attempt, self.retries, exc)
                time.sleep(self.backoff_s * attempt)
                continue
            parsed = parse_scores(raw, per_answer, answers)
            if parsed is not None:
                ref, model = (parsed[0], parsed[1]) if answers == 2 else ([], parsed[0])
                return Verdict(reference=list(ref), model=list(model), raw=raw, attempts=attempt)
            log.warning(
                "judge attempt %d/%d: could not read %d score(s) from %r",
                attempt,
                self.retries,
                per_answer * answers,
                raw[:80],
            )
        if last_error is not None and not raw:
            raise JudgeError(f"{last_error} (after {self.retries} attempts)")
        raise JudgeError(
            f"judge {self.backend.name} gave no parsable scores in {self.retries} attempts; last reply: {raw[:120]!r}"
        )

    def instruction(self, question: str, answer: str, reference: str | None = None) -> Verdict:
        """One overall 1-10 score for the answer (and for the reference, when given)."""
        if reference is None:
            return self._ask(SINGLE.format(question=question, answer=answer), 1, 1)
        return self._ask(PAIR.format(question=question, reference=reference, answer=answer), 1, 2)

    def summary(self, article: str, answer: str, reference: str) -> Verdict:
        """Four 1-10 scores (coherence, consistency, fluency, relevance) for reference and answer."""
        return self._ask(SUMMARY.format(question=article, reference=reference, answer=answer), 4, 2)


DEFAULT_KEY_ENV = "OPENAI_API_KEY"


def check_judge(url: str | None, model: str | None, key_env: str | None, local: str | None) -> None:
    """One clear line for a judge setting that cannot work, before anything is loaded.

    The key variable: one named with ``--judge-key-env`` must be set and non-empty. The default,
    ``OPENAI_API_KEY``, may be unset (keyless local endpoints: vLLM, llama.cpp server), and then no
    Authorization header is sent; set but empty it is an error, like any named variable."""
    if url and local:
        raise RecoupError("give either --judge-url or --judge-local, not both")
    if url:
        if not url.startswith(("http://", "https://")) or len(url) <= len("https://"):
            raise RecoupError(f"--judge-url must start with http:// or https:// (got '{url}')")
        if not model:
            raise RecoupError("--judge-url needs --judge-model (the model name the endpoint serves)")
        if key_env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key_env):
                raise RecoupError(f"--judge-key-env names an environment variable (got '{key_env}')")
            value = secret_env(key_env)
            if value is not None and not value.strip():
                raise RecoupError(f"--judge-key-env: ${key_env} is set but empty; export the judge's API key")
            if value is None and key_env != DEFAULT_KEY_ENV:
                raise RecoupError(f"--judge-key-env: ${key_env} is not set; export the judge's API key in it")
    elif model:
        raise RecoupError("--judge-model needs --judge-url")


def build_judge(
    url: str | None,
    model: str | None,
    key_env: str | None,
    local: str | None,
    retries: int = 3,
    dtype: str = "float32",
    device: str = "cpu",
    timeout: float = 120.0,
    max_tokens: int = 512,
) -> Judge | None:
    """The judge the CLI flags describe, or None when none is configured. ``timeout``: seconds per request to
    an endpoint; ``max_tokens``: the reply length cap (an endpoint's ``max_tokens``, a local judge's new tokens)."""
    check_judge(url, model, key_env, local)
    if url:
        return Judge(HttpJudge(url, model, key_env, timeout=timeout, max_tokens=max_tokens), retries=retries)
    if local:
        from recoup.artifact import load_model

        loaded = load_model(local, dtype=dtype, device=device)
        return Judge(LocalJudge(loaded, max_new_tokens=max_tokens), retries=retries)
    return None
