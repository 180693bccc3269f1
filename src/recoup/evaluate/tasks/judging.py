"""Judge every answer of a generative task, keeping what was judged when the judge fails."""

from __future__ import annotations

import logging

from tqdm.auto import tqdm

from recoup.evaluate.judge import SUMMARY_CRITERIA, Judge, JudgeError
from recoup.evaluate.metrics import summarize

log = logging.getLogger(__name__)


def judge_all(judge: Judge, kind: str, items: list[tuple[str, str, str | None]], records: list[dict]) -> dict:
    """Judge ``items`` ``(question_or_article, answer, reference)``; writes each verdict into ``records``.

    kind: ``summary`` (four scores each) or ``instruction`` (one overall score each). Returns
    ``judge_<score>`` means with stderr over the judged examples, ``n_judged`` and, when the judge
    failed, ``judge_error`` (one line); examples judged before the failure keep their scores.
    """
    names = [f"judge_{c}" for c in SUMMARY_CRITERIA] if kind == "summary" else ["judge_score"]
    per: dict[str, list[float]] = {}
    error = None
    judged = 0
    for (question, answer, reference), record in tqdm(
        list(zip(items, records)), desc=f"judge {kind}", unit="ex", leave=False
    ):
        try:
            verdict = (
                judge.summary(question, answer, reference)
                if kind == "summary"
                else judge.instruction(question, answer, reference)
            )
        except JudgeError as exc:
            error = str(exc)
            log.error("judge failed after %d judged example(s); keeping them: %s", judged, error)
            break
        judged += 1
        record["judge_raw"] = verdict.raw
        record["judge_attempts"] = verdict.attempts
        for name, value in zip(names, verdict.model):
            record[name] = value
            per.setdefault(name, []).append(value)
        for name, value in zip(names, verdict.reference):
            record[f"{name}_reference"] = value
            per.setdefault(f"{name}_reference", []).append(value)
    out = {**summarize(per), "n_judged": judged}
    if error is not None:
        out["judge_error"] = error
    return out
