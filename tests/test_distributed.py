"""Data-parallel recovery under torchrun (gloo, 2 CPU processes) saves what one process saves; `python -m recoup`.

The test launches ``torchrun --standalone --nproc-per-node 2 -m recoup recover ...`` as a subprocess: each rank
takes its half of every global batch, gradients are averaged, rank 0 alone validates and saves.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import save_tiny
from safetensors.torch import load_file
from test_dtypes import heldout_loss, starting_point
from test_run import write_corpus

from recoup.model.parallel import shard_bounds

SRC = str(Path(__file__).resolve().parents[1] / "src")
needs_torchrun = pytest.mark.skipif(
    importlib.util.find_spec("torch.distributed.run") is None or not torch.distributed.is_available(),
    reason="torchrun unavailable",
)


def _env() -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(PYTHONPATH=SRC, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    return env


def recoup(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = (
        [sys.executable, "-m", "recoup"]
        if nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "recoup",
        ]
    )
    proc = subprocess.run(launcher + args, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp")
    save_tiny(tmp / "model", "llama", hidden=32, layers=2)
    return tmp / "model", write_corpus(tmp / "corpus.txt")


def test_shards_cover_everything_once():
    for n in range(0, 9):
        for parts in (1, 2, 3, 4):
            cuts = [shard_bounds(n, parts, i) for i in range(parts)]
            assert cuts[0][0] == 0 and cuts[-1][1] == n and all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))
            assert max(b - a for a, b in cuts) - min(b - a for a, b in cuts) <= 1


def test_python_dash_m_recoup_is_the_cli():
    proc = recoup(["--version"])
    assert proc.stdout.startswith("recoup ")


@needs_torchrun
@pytest.mark.parametrize(
    "method,extra,weights",
    [
        ("soft-prompt", ["--tokens", "4", "--lr", "0.05"], "adapter_model.safetensors"),
        ("lora", ["--rank", "2", "--lr", "0.01"], "adapter_model.safetensors"),
    ],
)
def test_two_processes_save_the_recovery_one_process_saves(tiny, tmp_path, method, extra, weights):
    model, corpus = tiny
    common = [
        "recover",
        str(model),
        "--method",
        method,
        "--data",
        str(corpus),
        "--seqlen",
        "16",
        "--batch-size",
        "4",
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--val-windows",
        "2",
        "--seed",
        "3",
        *extra,
    ]
    one = recoup(common + ["--out", str(tmp_path / "one")])
    two = recoup(common + ["--out", str(tmp_path / "two")], nproc=2)
    assert "saved to" in one.stdout and two.stdout.count("saved to") == 1  # rank 1 prints nothing
    a, b = load_file(str(tmp_path / "one" / weights)), load_file(str(tmp_path / "two" / weights))
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), (k, (a[k] - b[k]).abs().max())
    # training moved the loss on text neither run saw, from where both started (so agreeing is not agreeing on
    # the untrained initialisation)
    from recoup.recover.methods import load_recovery

    heldout = write_corpus(tmp_path / "heldout.txt", 1500, seed=7)
    start = heldout_loss(model, starting_point(model, method, corpus, seed=3), heldout)
    trained = heldout_loss(model, load_recovery(tmp_path / "one"), heldout)
    assert trained < start - 0.02, (start, trained)


@needs_torchrun
def test_sharded_evaluation_on_two_processes_gives_the_one_process_metrics(tiny, tmp_path):
    import json

    model, corpus = tiny
    common = [
        "eval",
        str(model),
        "--tasks",
        f"arc_easy,ppl:{corpus}",
        "--limit",
        "7",
        "--seqlen",
        "256",
        "--batch-size",
        "2",
    ]
    recoup(common + ["--json", str(tmp_path / "one.json")])
    two = recoup(common + ["--json", str(tmp_path / "two.json")], nproc=2)
    assert two.stdout.count("arc_easy") >= 1
    one, both = (json.loads((tmp_path / f).read_text())["results"] for f in ("one.json", "two.json"))
    assert one.keys() == both.keys() == {"arc_easy", f"ppl:{corpus}"}
    for task in one:
        metrics = {k: v for k, v in one[task].items() if isinstance(v, (int, float)) and k != "seconds"}
        assert metrics and metrics == {k: both[task][k] for k in metrics}, task
