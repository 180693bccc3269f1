"""The LLM judge against a real OpenAI-compatible HTTP server started on 127.0.0.1 inside the test."""

from __future__ import annotations

import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import tiny_loaded

from recoup.errors import RecoupError
from recoup.evaluate.judge import HttpJudge, Judge, JudgeError, LocalJudge, build_judge, parse_scores
from recoup.evaluate.runner import EvalSettings
from recoup.evaluate.tasks import instruction, summarization
from recoup.evaluate.tasks.judging import judge_all

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / "tests" / "data" / "llm-kick"  # LLM-KICK's files, copied unchanged


class FakeJudgeServer:
    """Serves /v1/chat/completions; ``replies`` is consumed in order (a callable gets the request body)."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                if self.path != "/v1/chat/completions":  # a client posting elsewhere gets what a real server sends
                    self.send_error(404, f"no route {self.path}")
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                outer.headers.append(dict(self.headers))
                reply = outer.replies.pop(0) if outer.replies else "no more scripted replies"
                if isinstance(reply, tuple):  # (status, raw bytes)
                    status, payload = reply
                else:
                    message = {"role": "assistant", "content": reply}
                    status, payload = 200, json.dumps({"choices": [{"message": message}]}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_parse_scores_is_tolerant():
    assert parse_scores("8 6\nAssistant 1 was better.", 1, 2) == ([8.0], [6.0])
    assert parse_scores("Scores: 7.5, 9\nbecause", 1, 2) == ([7.5], [9.0])
    assert parse_scores("Assistant 1: 9/10\nAssistant 2: 4/10\n", 1, 2) == ([9.0], [4.0])
    assert parse_scores("8 7 9 8\n5 6 7 4\nexplanation 1. 2.", 4, 2) == ([8, 7, 9, 8], [5, 6, 7, 4])
    assert parse_scores("Summary 1: 8 7 9 8 Summary 2: 5 6 7 4", 4, 2) == ([8, 7, 9, 8], [5, 6, 7, 4])
    assert parse_scores("7", 1, 1) == ([7.0],)
    assert parse_scores("I cannot decide.", 1, 2) is None
    assert parse_scores("85 90", 1, 2) is None  # out of the 1-10 range


def test_http_judge_pairwise_end_to_end_with_key_from_env(monkeypatch, caplog):
    monkeypatch.setenv("RECOUP_TEST_JUDGE_KEY", "sk-secret-123")
    with FakeJudgeServer(["9 4\nAssistant 1 answers the question.", "garbled", "7 7\nequal"]) as srv:
        judge = Judge(HttpJudge(srv.url, "judge-model", "RECOUP_TEST_JUDGE_KEY"), retries=2, backoff_s=0)
        with caplog.at_level(logging.DEBUG):
            first = judge.instruction("How?", "badly", reference="well")
            second = judge.instruction("Why?", "because", reference="since")
    assert (first.reference, first.model, first.attempts) == ([9.0], [4.0], 1)
    assert (second.reference, second.model, second.attempts) == ([7.0], [7.0], 2)  # one retry after "garbled"
    assert "Assistant 1 answers" in first.raw
    assert srv.requests[0]["model"] == "judge-model" and srv.requests[0]["temperature"] == 0
    assert "well" in srv.requests[0]["messages"][1]["content"] and "badly" in srv.requests[0]["messages"][1]["content"]
    assert srv.headers[0]["Authorization"] == "Bearer sk-secret-123"
    assert "sk-secret-123" not in caplog.text


def test_unreachable_judge_is_a_clear_error():
    judge = Judge(HttpJudge(f"http://127.0.0.1:{free_port()}/v1", "m", None, timeout=2), retries=2, backoff_s=0)
    with pytest.raises(JudgeError, match="unreachable"):
        judge.instruction("q", "a")


def test_a_judge_slower_than_its_timeout_is_named_slow_not_unreachable():
    """A listening endpoint that never answers (a CPU judge mid-reply) is reported as slow, with the flag to raise."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # accepts the connection, never replies
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        judge = Judge(HttpJudge(url, "m", None, timeout=0.5), retries=1, backoff_s=0)
        with pytest.raises(JudgeError, match=r"no reply within 0.5 s \(raise --judge-timeout\)"):
            judge.instruction("q", "a")


def test_judge_timeout_and_reply_cap_reach_the_request():
    with FakeJudgeServer(["8"]) as srv:
        judge = build_judge(srv.url, "m", None, None, retries=1, timeout=33.0, max_tokens=64)
        assert judge.backend.timeout == 33.0
        judge.instruction("q", "a")
    assert srv.requests[0]["max_tokens"] == 64


@pytest.mark.parametrize("flag,value", [("--judge-timeout", "0"), ("--judge-max-tokens", "4")])
def test_bad_judge_timeout_or_cap_is_one_line(flag, value, capsys):
    from recoup.cli import main

    assert main(["eval", "smollm2-135m", "--tasks", "ppl:ptb", flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag.lstrip("-").replace("-", "_") in err[0], err


def test_http_error_and_non_json_reply_are_clear_errors():
    with FakeJudgeServer([(500, b"oops"), (200, b"<html>not json</html>")]) as srv:
        judge = Judge(HttpJudge(srv.url, "m", None), retries=1, backoff_s=0)
        with pytest.raises(JudgeError, match="HTTP 500"):
            judge.instruction("q", "a")
        with pytest.raises(JudgeError, match="not an OpenAI chat completion"):
            judge.instruction("q", "a")


def test_judge_all_keeps_examples_judged_before_a_failure():
    with FakeJudgeServer(["8", "6", "nonsense", "nonsense"]) as srv:
        judge = Judge(HttpJudge(srv.url, "m", None), retries=2, backoff_s=0)
        records = [{"id": str(i)} for i in range(4)]
        out = judge_all(judge, "instruction", [(f"q{i}", f"a{i}", None) for i in range(4)], records)
    assert out["n_judged"] == 2 and out["judge_score"] == pytest.approx(7.0)
    assert "no parsable scores" in out["judge_error"]
    assert records[0]["judge_score"] == 8.0 and records[1]["judge_raw"] == "6" and "judge_score" not in records[2]


@pytest.mark.skipif(not (SHARED / "instruction_questions.jsonl").is_file(), reason="LLM-KICK questions missing")
def test_instruction_task_with_judge_and_reference(tmp_path):
    ref = tmp_path / "ref.jsonl"
    ref.write_text(
        "".join(json.dumps({"question_id": i, "text": f"reference answer {i}"}) + "\n" for i in range(1, 81))
    )
    lm = tiny_loaded("llama")
    with FakeJudgeServer(["9 3\nreference is better"] * 3) as srv:
        judge = build_judge(srv.url, "m", None, None, retries=1)
        options = {
            "instructions_file": str(SHARED / "instruction_questions.jsonl"),
            "instructions_reference": str(ref),
            "max_new_tokens": "4",
            "judge": judge,
        }
        settings = EvalSettings(limit=3, seed=0, batch_size=3, options=options)
        res = instruction.run("instructions", lm, settings, None)
    assert res["n"] == 3 and res["n_judged"] == 3
    assert res["judge_score"] == 3.0 and res["judge_score_reference"] == 9.0
    assert all(r["judge_raw"].startswith("9 3") for r in res["examples"])
    assert "reference answer" in srv.requests[0]["messages"][1]["content"]
    assert res["unique_tokens"] >= 1 and res["protocol"]["judge_mode"].startswith("pairwise")


@pytest.mark.skipif(not (SHARED / "cnn_dm_stories.jsonl").is_file(), reason="LLM-KICK stories missing")
def test_summary_task_with_unreachable_judge_keeps_rouge():
    lm = tiny_loaded("llama")
    judge = Judge(HttpJudge(f"http://127.0.0.1:{free_port()}/v1", "m", None, timeout=2), retries=1, backoff_s=0)
    options = {"cnndm_file": str(SHARED / "cnn_dm_stories.jsonl"), "max_new_tokens": "4", "judge": judge}
    res = summarization.run("cnndm", lm, EvalSettings(limit=2, seqlen=512, options=options), None)
    assert res["n"] == 2 and res["n_judged"] == 0 and "unreachable" in res["judge_error"]
    assert 0.0 <= res["rougeL"] <= 1.0 and len(res["examples"]) == 2


def test_summary_judge_four_scores():
    with FakeJudgeServer(["8 8 9 7\n4 5 6 3\nwhy"]) as srv:
        v = Judge(HttpJudge(srv.url, "m", None), retries=1).summary("article", "summary", "reference")
    assert v.reference == [8, 8, 9, 7] and v.model == [4, 5, 6, 3]


def test_local_judge_runs_a_local_model():
    judge = Judge(LocalJudge(tiny_loaded("llama"), max_new_tokens=3), retries=1)
    with pytest.raises(JudgeError, match="no parsable scores"):  # a random tiny model writes no scores
        judge.instruction("q", "a")


def test_build_judge_flag_errors():
    assert build_judge(None, None, None, None) is None
    with pytest.raises(RecoupError, match="--judge-model"):
        build_judge("http://x/v1", None, None, None)
    with pytest.raises(RecoupError, match="http"):
        build_judge("ftp://x", "m", None, None)
    with pytest.raises(RecoupError, match="not both"):
        build_judge("http://x/v1", "m", None, "smollm2-135m")


@pytest.mark.skipif(not (SHARED / "cnn_dm_stories.jsonl").is_file(), reason="LLM-KICK stories missing")
def test_recoup_eval_with_a_judge_records_its_scores_per_example_and_as_means(tmp_path, monkeypatch):
    """The success path end to end: `recoup eval --judge-url` against an OpenAI-compatible server that answers
    with parsable scores; the result JSON holds every example's scores, their means and the judge's protocol."""
    from helpers import save_tiny

    from recoup.cli import main

    monkeypatch.setenv("RECOUP_TEST_JUDGE_KEY", "sk-test")
    save_tiny(tmp_path / "model")
    out = tmp_path / "r.json"
    with FakeJudgeServer(["8 7 9 6\n3 4 2 5\nthe reference is better", "9 9 8 7\n5 6 4 3\nsame"]) as srv:
        code = main(
            [
                "eval",
                str(tmp_path / "model"),
                "--tasks",
                "cnndm",
                "--limit",
                "2",
                "--seqlen",
                "512",
                "--option",
                f"cnndm_file={SHARED / 'cnn_dm_stories.jsonl'}",
                "--option",
                "max_new_tokens=4",
                "--judge-url",
                srv.url,
                "--judge-model",
                "judge-m",
                "--judge-key-env",
                "RECOUP_TEST_JUDGE_KEY",
                "--json",
                str(out),
            ]
        )
    assert code == 0 and len(srv.requests) == 2 and srv.requests[0]["model"] == "judge-m"
    res = json.loads(out.read_text())["results"]["cnndm"]
    assert res["n_judged"] == 2 and "judge_error" not in res
    coherence = [r["judge_coherence"] for r in res["examples"]]
    assert sorted(coherence) == [3.0, 5.0] and res["judge_coherence"] == pytest.approx(4.0)
    assert sorted(r["judge_coherence_reference"] for r in res["examples"]) == [8.0, 9.0]
    assert res["protocol"]["judge"]["judge"].startswith("judge-m @ http://127.0.0.1")
    assert "sk-test" not in out.read_text()
    # the llama.cpp benchmark's summary reads this very file (the llama-server judge test asserts on it)
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_llama_cpp", ROOT / "benchmarks" / "llama_cpp.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    summary = bench.summarize_judged(json.loads(out.read_text()), "recoup eval ...", 0.0)["tasks"]
    assert set(summary) == {"cnndm"} and summary["cnndm"]["n_judged"] == 2
    assert summary["cnndm"]["judge_scores"]["judge_coherence"] == pytest.approx(4.0)
    assert summary["cnndm"]["parse_retries"] == 0 and summary["cnndm"]["judge_error"] is None
