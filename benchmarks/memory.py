"""Benchmark memory: peak host RSS and wall time of compress and eval on real model shapes with random weights.

Builds random-weight checkpoints of real shapes on disk (bf16 safetensors shards of at most 2 GB, the bundled
model's tokenizer, so the vocabulary is 49152): ``llama-3.2-1b`` (hidden 2048, 16 layers, MLP 8192, 32/8 heads,
tied embeddings), ``llama-3-8b`` (hidden 4096, 32 layers, MLP 14336, 32/8 heads) and ``llama-3-8b-Nl`` (the
8B shapes with N = 2 or 4 of its layers). Then, each cell its own
``recoup`` process whose peak RSS is read with ``wait4`` (its own ``ru_maxrss``):

- ``compress`` Wanda 50% and RTN w4 g128 (``--lazy``, the default: one decoder layer read at a time; with
  ``--eager`` also ``--no-lazy``, the whole model loaded first), PTB calibration ``--nsamples`` x ``--seqlen``;
- ``eval`` of the Wanda artifact on one PTB window (``--limit 1``) with ``--dtype bfloat16`` on CPU.

Random weights are fine for memory and time (the work per layer does not depend on the values); quality is
measured on real models (benchmarks/compress_vs_peer.py, benchmarks/eval.py).

    python benchmarks/memory.py --shapes llama-3.2-1b --eager
    nice -n 10 python benchmarks/memory.py --shapes llama-3-8b --cells wanda,rtn

Prints a table and writes JSON under benchmarks/results/memory/ (one file per shape).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "memory"
SHAPES = {
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
    "llama-3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        rope_theta=500000.0,
    ),
}
# LLaMA-3-8B's decoder layer and embeddings with fewer layers: what one 8B layer costs, and whether peak memory
# grows with depth (with lazy weights it should not), without 16 GB of checkpoint and 32 layers of CPU time
SHAPES.update({f"llama-3-8b-{n}l": {**SHAPES["llama-3-8b"], "num_hidden_layers": n} for n in (2, 4)})
RECIPES = {
    "wanda": ["--method", "wanda", "--sparsity", "0.5"],
    "rtn": ["--method", "rtn", "--bits", "4", "--group-size", "128"],
}
SHARD_BYTES = 2 * 10**9


def machine() -> dict:
    mem = next((int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    return {
        "cpus": os.cpu_count(),
        "memory_gb": round(mem / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpu": "none",
    }


def build(shape: str, folder: Path) -> dict:
    """Write a random-weight bf16 checkpoint of ``shape`` to ``folder`` (once), one tensor in memory at a time."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from recoup.model.load import bundled_model_dir

    if (folder / "config.json").is_file():
        return json.loads((folder / "recoup-memory-shape.json").read_text())
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = AutoTokenizer.from_pretrained(str(bundled_model_dir()))
    config = LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=8192,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        dtype="bfloat16",
        **SHAPES[shape],
    )
    with init_empty_weights():
        skel = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    skel.tie_weights()
    seen, names = set(), []
    for name, p in skel.named_parameters():  # a tied weight once, under its first name
        if id(p) not in seen:
            seen.add(id(p))
            names.append((name, tuple(p.shape)))
    gen = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    weight_map, files, size, params = {}, [], 0, 0
    t0 = time.time()

    def flush():
        nonlocal shard, size
        f = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(tmp / f), metadata={"format": "pt"})
        files.append(f)
        weight_map.update({k: f for k in shard})
        shard, size = {}, 0

    for name, shp in names:
        t = torch.ones(shp) if name.endswith("norm.weight") else torch.randn(shp, generator=gen) * 0.02
        shard[name] = t.to(torch.bfloat16)
        size += shard[name].numel() * 2
        params += shard[name].numel()
        del t
        if size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    total = sum((tmp / f).stat().st_size for f in files)
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True)
    )
    config.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    info = {
        "shape": shape,
        **SHAPES[shape],
        "vocab_size": len(tok),
        "parameters": params,
        "bytes_on_disk": total,
        "build_seconds": round(time.time() - t0, 1),
    }
    (tmp / "recoup-memory-shape.json").write_text(json.dumps(info, indent=1))
    os.replace(tmp, folder)
    return info


def measure(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` (its output to ``log``); its own peak RSS (wait4) and wall time, and per-layer seconds."""
    t0 = time.time()
    with open(log, "w") as fh:
        env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - t0
    text = log.read_text(errors="replace")
    layers = [float(s) for s in re.findall(r"layer \d+: ([0-9.]+)s", text)]
    return {
        "cmd": " ".join(cmd[2:]),
        "rc": os.waitstatus_to_exitcode(status),
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024),
        "layer_seconds": layers,
        "mean_layer_s": round(sum(layers) / len(layers), 2) if layers else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="llama-3.2-1b")
    ap.add_argument("--cells", default="wanda,rtn,eval", help="wanda, rtn (compress) and eval (of the wanda one)")
    ap.add_argument("--eager", action="store_true", help="also compress with --no-lazy (the whole model loaded)")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument(
        "--work",
        default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "recoup-memory"),
        help="where the checkpoints and artifacts go",
    )
    ap.add_argument("--keep", action="store_true", help="keep the artifacts (the checkpoints are always kept)")
    ap.add_argument(
        "--merge",
        action="store_true",
        help="add to this shape's JSON instead of replacing it (cells not run now keep their earlier figures)",
    )
    args = ap.parse_args()
    work = Path(args.work)
    cells = args.cells.split(",")
    recoup = [sys.executable, "-m", "recoup"]
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in args.shapes.split(","):
        info = build(shape, work / shape)
        ckpt = work / shape
        result = {
            "shape": info,
            "machine": machine(),
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "calibration": {"corpus": "ptb", "nsamples": args.nsamples, "seqlen": args.seqlen},
            "weights": "random (memory and time only)",
            "cells": {},
        }
        for recipe in (r for r in ("wanda", "rtn") if r in cells):
            for mode in ("lazy", "eager") if args.eager else ("lazy",):
                art = work / f"{shape}-{recipe}-{mode}"
                cmd = recoup + [
                    "compress",
                    str(ckpt),
                    *RECIPES[recipe],
                    "--calib",
                    "ptb",
                    "--nsamples",
                    str(args.nsamples),
                    "--seqlen",
                    str(args.seqlen),
                    "--device",
                    "cpu",
                    "--out",
                    str(art),
                    "--force",
                    "--lazy" if mode == "lazy" else "--no-lazy",
                ]
                cell = measure(cmd, work / f"{shape}-{recipe}-{mode}.log")
                if cell["rc"] == 0:
                    cell["artifact_bytes"] = json.loads((art / "recoup.json").read_text())["storage"]["bytes"]
                result["cells"][f"compress {recipe} {mode}"] = cell
                rows.append((shape, f"compress {recipe} {mode}", cell))
                print(
                    f"{shape:14s} compress {recipe:5s} {mode:5s} rc={cell['rc']} peak RSS {cell['peak_rss_mb']:7d} MB"
                    f"  wall {cell['wall_s']:7.1f} s  layer {cell['mean_layer_s']} s",
                    flush=True,
                )
        if "eval" in cells:
            art = work / f"{shape}-wanda-lazy"
            cmd = recoup + [
                "eval",
                str(art),
                "--tasks",
                "ppl:ptb",
                "--limit",
                "1",
                "--seqlen",
                str(args.seqlen),
                "--dtype",
                "bfloat16",
                "--device",
                "cpu",
                "--json",
                str(work / f"{shape}-eval.json"),
            ]
            cell = measure(cmd, work / f"{shape}-eval.log")
            result["cells"]["eval bf16 one window"] = cell
            rows.append((shape, "eval bf16 one window", cell))
            print(
                f"{shape:14s} eval bf16 1 window  rc={cell['rc']} peak RSS {cell['peak_rss_mb']:7d} MB  "
                f"wall {cell['wall_s']:7.1f} s",
                flush=True,
            )
        prior = OUT / f"{shape}.json"
        if args.merge and prior.is_file():  # cells measured by another run of the same shape are kept
            result["cells"] = {**json.loads(prior.read_text()).get("cells", {}), **result["cells"]}
        prior.write_text(json.dumps(result, indent=1))
        if not args.keep:
            for art in work.glob(f"{shape}-*-*"):
                if art.is_dir():
                    shutil.rmtree(art, ignore_errors=True)
    print(f"\n{'shape':14s} {'cell':24s} {'peak RSS MB':>12s} {'wall s':>8s} {'s/layer':>8s}")
    for shape, name, cell in rows:
        print(f"{shape:14s} {name:24s} {cell['peak_rss_mb']:12d} {cell['wall_s']:8.1f} {cell['mean_layer_s'] or '':>8}")


if __name__ == "__main__":
    main()
