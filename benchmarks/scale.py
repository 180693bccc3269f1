"""Benchmark scale-out: a sweep on the local executor vs Ray, and recovery training memory/throughput by dtype.

1. ``sweep``: the shipped ``sweep`` recipe on the default model (smollm2-135m), 2 methods x 3 sparsities = 6
   cells (+ the dense evaluation = 13 stages), shrunk with ``--set`` overrides so it fits a CPU box, run with the
   local executor and with Ray on a local cluster (started by the executor); wall time of each and whether
   every metric row is identical.
2. ``train``: soft-prompt and LoRA training through recoup's fit functions (the one training loop) on a
   LLaMA-3.2-1B-shaped model with random weights (hidden 2048, 16 layers, MLP 8192, 32/8 heads, vocab 128256),
   in float32, bfloat16 (autocast, float32 trainable state) and bfloat16 + gradient checkpointing. Each cell is
   its own process, so its peak RSS (``ru_maxrss``) is its own; tokens/s includes the first (warm-up) step.

    python benchmarks/scale.py sweep
    python benchmarks/scale.py train --seqlen 256 --steps 2
    python benchmarks/scale.py all

Prints a table and writes JSON under benchmarks/results/scale/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "scale"
SWEEP_SET = [
    "sweep.methods=[magnitude,wanda]",
    "sweep.sparsity=[0.3,0.5,0.7]",
    "calibration.nsamples=8",
    "calibration.seqlen=256",
    "evaluate.limit=4",
    "evaluate.seqlen=256",
    "evaluate.limits={arc_easy: 20}",
]
LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=131072,
    tie_word_embeddings=True,
    rope_theta=500000.0,
)


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "load1": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
    }


# ----------------------------------------------------------------------------- 1. sweep: local vs Ray
def sweep(args) -> dict:
    from recoup.recipe import load_recipe
    from recoup.runs.executor import make_executor
    from recoup.runs.run import run_recipe
    from recoup.runs.store import Store

    recipe = load_recipe("sweep", SWEEP_SET)
    tmp = Path(tempfile.mkdtemp(prefix="recoup-scale-"))
    rows, values = [], {}
    with Store(tmp / "store.sqlite") as store:
        for name in args.executors:
            t0 = time.time()
            executor = make_executor(name)  # ray: a local cluster, started here and shut down by the run
            outcome = run_recipe(recipe, tmp / name, store, executor=executor, report=False)
            wall = time.time() - t0
            values[name] = {
                (m["stage"], m["task"], m["metric"]): m["value"]
                for m in store.metrics(outcome.run_id)
                if m["task"] != "compress" or m["metric"] in ("sparsity", "mean_error")
            }
            rows.append(
                {
                    "executor": name,
                    "wall_s": round(wall, 1),
                    "stages": len(outcome.ran),
                    "metric_rows": len(values[name]),
                }
            )
    first = values[args.executors[0]]
    for row in rows:
        row["metrics_identical"] = values[row["executor"]] == first
    return {"recipe": "sweep", "overrides": SWEEP_SET, "rows": rows, "machine": machine()}


# ----------------------------------------------------------------------------- 2. training memory / speed
def train_cell(method: str, dtype: str, ckpt: bool, seqlen: int, steps: int, batch: int) -> dict:
    """One cell, in this process: build the model, train, report peak RSS and tokens/s."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from recoup.model.load import LoadedModel, bundled_model_dir, parse_dtype
    from recoup.recover.methods import RECOVERIES
    from recoup.recover.task_data import TuningData
    from recoup.recover.train import training_context

    torch.manual_seed(0)
    t0 = time.time()
    model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_1B), dtype=parse_dtype(dtype)).eval()
    build_s = time.time() - t0
    tok = AutoTokenizer.from_pretrained(str(bundled_model_dir()))
    loaded = LoadedModel(model=model, tokenizer=tok, source="llama-3.2-1b-shape (random)", path=None)
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ids = torch.randint(0, tok.vocab_size, (seqlen * (batch * steps + 4),))
    data = TuningData(train=[], valid=[], protocol={"data": "random tokens"}, lm_ids=ids, seqlen=seqlen)
    spec = RECOVERIES.get(method)
    extra = {"tokens": 20} if method == "soft-prompt" else {"rank": 8}
    config = spec.config(
        data="random",
        seqlen=seqlen,
        batch_size=batch,
        steps=steps,
        eval_every=steps,
        gradient_checkpointing=ckpt,
        **extra,
    )
    with training_context(model, ckpt):
        _, result = spec.fit(loaded, config, data)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "method": method,
        "dtype": dtype,
        "checkpointing": ckpt,
        "seqlen": seqlen,
        "batch": batch,
        "steps": result.steps,
        "train_s": round(result.seconds, 1),
        "tokens": result.tokens,
        "tokens_per_s": round(result.tokens / result.seconds, 1),
        "peak_rss_mb": round(peak),
        "rss_after_model_mb": round(rss_model),
        "model_build_s": round(build_s, 1),
        "params": sum(p.numel() for p in model.parameters()),
    }


def train(args) -> dict:
    rows = []
    for method in args.methods:
        for dtype, ckpt in (("float32", False), ("bfloat16", False), ("bfloat16", True)):
            cmd = [
                sys.executable,
                __file__,
                "_cell",
                method,
                dtype,
                str(int(ckpt)),
                str(args.seqlen),
                str(args.steps),
                str(args.batch),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append(
                    {
                        "method": method,
                        "dtype": dtype,
                        "checkpointing": ckpt,
                        "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed",
                    }
                )
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr, flush=True)
            (OUT / "train.partial.json").write_text(json.dumps(rows, indent=1))  # a long run keeps what it measured
    return {
        "shape": "LLaMA-3.2-1B (random weights)",
        "config": LLAMA_1B,
        "rows": rows,
        "machine": machine(),
        "note": f"seqlen {args.seqlen}, batch {args.batch}, {args.steps} steps per cell (1024 x many steps is "
        f"too slow on this CPU box); tokens/s includes the first step; no GPU measured",
    }


def table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_cell":
        method, dtype, ckpt, seqlen, steps, batch = sys.argv[2:8]
        import logging

        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(train_cell(method, dtype, bool(int(ckpt)), int(seqlen), int(steps), int(batch))))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["sweep", "train", "all"])
    p.add_argument("--executors", nargs="+", default=["local", "ray"])
    p.add_argument("--methods", nargs="+", default=["soft-prompt", "lora"])
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for what in ["sweep", "train"] if args.what == "all" else [args.what]:
        result = sweep(args) if what == "sweep" else train(args)
        (OUT / f"{what}.json").write_text(json.dumps(result, indent=1))
        print(f"## {what}\n\n{table(result['rows'])}\n")
        print(f"written: {OUT / (what + '.json')}")


if __name__ == "__main__":
    main()
