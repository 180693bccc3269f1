"""Benchmark activations: peak host RSS and wall time of `recoup compress` as the calibration activations are held
in float32, in bfloat16 (``--activation-dtype``) or in a memory-mapped file (``--activation-budget-mb``).

A random-weight LLaMA-shaped checkpoint whose calibration activations are large next to its layers (hidden 256,
2 layers, MLP 1024, 4/2 heads, the bundled tokenizer's 49152 words; built by :func:`memory.build`), compressed
with Wanda 50% (lazy weights, the default) on ``--nsamples`` x ``--seqlen`` PTB windows, each cell in its own
process whose peak RSS is read with ``wait4`` (:func:`memory.measure`). What differs between the cells is the
activations: 4 x nsamples x seqlen x hidden bytes in float32, half in bfloat16, about one batch in a file. The
activations must outweigh the fixed cost (torch, the tokenizer, the corpus: about 1.1 GB here) for the peak to show
them, hence the many windows of a small model.

    nice -n 10 python benchmarks/activations.py     # 512 x 2048 windows: 1 GiB of float32 activations

Prints a table and writes JSON under benchmarks/results/activations/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory  # noqa: E402  (benchmarks/memory.py: the checkpoint builder and the per-process measurement)

OUT = Path(__file__).resolve().parent / "results" / "activations"
SHAPE = "toy-h256-2l"
memory.SHAPES[SHAPE] = dict(
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    rope_theta=500000.0,
)
# Every cell re-runs each layer per group (the budgets are below what parked forwards would need, 9x the
# float32 activations here), so the cells differ only in how the activations are held: 2048 MiB holds them in
# memory, 32 MiB sends them to a file.
CELLS = {
    "float32 in memory": ["--activation-budget-mb", "2048"],
    "bfloat16 in memory": ["--activation-dtype", "bfloat16", "--activation-budget-mb", "2048"],
    "float32 in a file": ["--activation-budget-mb", "32"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nsamples", type=int, default=512)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--work", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "recoup-actbench"))
    args = ap.parse_args()
    work = Path(args.work)
    info = memory.build(SHAPE, work / SHAPE)
    result = {
        "shape": info,
        "machine": memory.machine(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "calibration": {"corpus": "ptb", "nsamples": args.nsamples, "seqlen": args.seqlen},
        "recipe": "wanda 50%, lazy weights, --device cpu",
        "activations_float32_mib": args.nsamples * args.seqlen * info["hidden_size"] * 4 / 2**20,
        "weights": "random (memory and time only)",
        "cells": {},
    }
    digests = set()
    for name, flags in CELLS.items():
        art = work / f"art-{name.replace(' ', '-')}"
        cmd = [sys.executable, "-m", "recoup", "compress", str(work / SHAPE), "--method", "wanda", "--sparsity", "0.5"]
        cmd += ["--calib", "ptb", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--device", "cpu"]
        cmd += ["--out", str(art), "--force", *flags]
        cell = memory.measure(cmd, work / f"{art.name}.log")
        if cell["rc"] == 0:
            manifest = json.loads((art / "recoup.json").read_text())
            record = manifest["calibration"]
            cell["calibration_record"] = {k: record[k] for k in ("activation_dtype", "activation_storage")}
            cell["mean_error"] = manifest["summary"]["mean_error"]
            weights = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(art.glob("*.safetensors"))))
            digests.add((name.split()[0], weights.hexdigest()))
        result["cells"][name] = cell
        print(
            f"{name:20s} rc={cell['rc']} peak RSS {cell['peak_rss_mb']:6d} MB  wall {cell['wall_s']:6.1f} s", flush=True
        )
    # a file changes where the activations live, not a value: same weights as in memory, per dtype
    result["file_equals_memory"] = len(digests) == len({d for d, _ in digests})
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{SHAPE}.json").write_text(json.dumps(result, indent=1))
    print(f"\n{'cell':20s} {'peak RSS MB':>12s} {'wall s':>8s} {'mean error':>11s}")
    for name, cell in result["cells"].items():
        print(
            f"{name:20s} {cell['peak_rss_mb']:12d} {cell['wall_s']:8.1f} {cell.get('mean_error', float('nan')):11.5f}"
        )
    print(f"file artifacts identical to in-memory ones: {result['file_equals_memory']}")


if __name__ == "__main__":
    main()
