"""The CLI contract: bad input gives one line on stderr and exit code 2."""

import json
import subprocess
import sys

import pytest
from helpers import save_tiny


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "recoup.cli", *args], capture_output=True, text=True, env=env)


def test_version_and_help():
    out = run("--version")
    assert out.returncode == 0 and out.stdout.startswith("recoup ")
    assert run("eval", "--help").returncode == 0


@pytest.mark.parametrize(
    "args,needle",
    [
        (["eval", "./no/such/model"], "no such file or directory"),
        (["eval", "smollm2-135m", "--limit", "x"], "invalid int value"),
        (["eval", "smollm2-135m", "--limit", "0"], "limit must be a positive integer"),
        (["nosuchcommand"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, needle):
    out = run(*args)
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stderr
    assert needle in lines[0]
    assert "Traceback" not in out.stderr


def test_eval_local_model_writes_json(tmp_path):
    save_tiny(tmp_path / "m")
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello there general kenobi. " * 30)
    out = run(
        "eval",
        str(tmp_path / "m"),
        "--tasks",
        f"ppl:{corpus}",
        "--seqlen",
        "32",
        "--limit",
        "3",
        "--json",
        str(tmp_path / "r.json"),
    )
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    res = data["results"][f"ppl:{corpus}"]
    assert res["windows"] == 3 and res["tokens"] == 3 * 31 and res["ppl"] > 1
    assert data["protocol"]["seqlen"] == 32
