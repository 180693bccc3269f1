"""Benchmark memory: peak host RSS and wall time of compress and eval on real model shapes with random weights.

Builds random-weight checkpoints of real shapes on disk (bf16 safetensors shards of at most 2 GB, the bundled
model's tokenizer, so the vocabulary is 49152): ``smollm2-135m`` (the bundled model's shape: hidden 576, 30
layers), ``llama-3.2-1b`` (hidden 2048, 16 layers, MLP 8192, 32/8 heads, tied embeddings), ``llama-3-8b`` (hidden
4096, 32 layers, MLP 14336, 32/8 heads) and ``llama-3-8b-Nl`` (the 8B shapes with N = 1, 2 or 4 of its layers).
Then, each cell its own
``recoup`` process whose peak RSS is read with ``wait4`` (its own ``ru_maxrss``; forked by a small launcher
process, since a child's ``ru_maxrss`` starts at the peak RSS of the process that forked it):

- ``compress`` Wanda 50%, RTN w4 g128 and (``--cells gptq``) GPTQ w4 g128 (``--lazy``, the default: one decoder
  layer read at a time; with ``--eager`` also ``--no-lazy``, the whole model loaded first), PTB calibration
  ``--nsamples`` x ``--seqlen``;
- ``eval`` of the Wanda artifact on one PTB window (``--limit 1``) with ``--dtype bfloat16`` on CPU;
- ``eora``: ``recoup recover`` of the RTN artifact (else the Wanda one) ``--method eora --rank 32`` on the same
  calibration size, the artifact and its dense source read one layer at a time (``--eager``: also ``--no-lazy``);
- ``peer-wanda`` and ``peer-rtn``: the same two compressions by the peer tool llm-compressor
  (benchmarks/compress_peer_worker.py in llm-compressor's own virtual environment, ``--peer-venv``, created with
  ``--peer-version`` by benchmarks/compress_vs_peer.py's ``ensure_peer`` when missing): ``WandaPruningModifier``
  at 50% and ``QuantizationModifier`` int4 group 128 symmetric (recoup's RTN default grid), ``oneshot`` on the
  *same token windows* recoup calibrates on (recoup's own ``calibration_windows``, saved to the work folder),
  nothing written (``--no-save``). Its loader reads the whole model (``AutoModelForCausalLM.from_pretrained``,
  float32: recoup's compute dtype on CPU) before it compresses; the cell records the dtype, the llmcompressor
  and torch versions, and the ``oneshot`` call's own seconds beside the process's wall time. A peer that cannot
  be installed or fails records why (one line) and the run goes on.

Random weights are fine for memory and time (the work per layer does not depend on the values); quality is
measured on real models (benchmarks/compress_vs_peer.py, benchmarks/eval.py).

    python benchmarks/memory.py --shapes llama-3.2-1b --eager
    nice -n 10 python benchmarks/memory.py --shapes llama-3-8b --cells wanda,rtn
    python benchmarks/memory.py --shapes llama-3.2-1b --cells wanda,rtn,peer-wanda,peer-rtn --nsamples 2 --seqlen 128

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
    # SmolLM2-135M's shape (the bundled model's): small enough for the slow cells (EoRA's eigen-decompositions)
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
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
SHAPES.update({f"llama-3-8b-{n}l": {**SHAPES["llama-3-8b"], "num_hidden_layers": n} for n in (1, 2, 4)})
RECIPES = {
    "wanda": ["--method", "wanda", "--sparsity", "0.5"],
    "rtn": ["--method", "rtn", "--bits", "4", "--group-size", "128"],
    "gptq": ["--method", "gptq", "--bits", "4", "--group-size", "128"],
}
# peer cell -> (recoup's recipe of the same compression, compress_peer_worker.py's recipe name)
PEER_RECIPES = {"peer-wanda": ("wanda", "wanda-50"), "peer-rtn": ("rtn", "rtn-w4g128")}
PEER_WORKER = Path(__file__).resolve().parent / "compress_peer_worker.py"
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


# Forks and execs the measured command from a fresh small process and writes its wait4 status and peak RSS to
# argv[1]. A process's ru_maxrss starts at the peak RSS of the process it was forked from (Linux carries the
# parent's high-water mark over fork and exec), so a child forked by this script directly would report at least
# this script's own peak (the checkpoint build, the calibration windows): the launcher's is ~10 MB.
LAUNCHER = """
import json, os, sys, time
t0 = time.time()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as fh:
    json.dump({"status": status, "maxrss_kb": usage.ru_maxrss, "wall_s": time.time() - t0}, fh)
"""


def measure(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` (its output to ``log``); its own peak RSS (wait4) and wall time, and per-layer seconds."""
    usage_file = log.with_name(log.name + ".rusage.json")
    usage_file.unlink(missing_ok=True)
    with open(log, "w") as fh:
        env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
        launch = [sys.executable, "-S", "-c", LAUNCHER, str(usage_file), *cmd]
        proc = subprocess.run(launch, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if not usage_file.is_file():
        raise RuntimeError(f"the measuring launcher failed (rc {proc.returncode}) for {' '.join(cmd)}")
    usage = json.loads(usage_file.read_text())
    usage_file.unlink()
    status, wall = usage["status"], usage["wall_s"]
    text = log.read_text(errors="replace")
    layers = [float(s) for s in re.findall(r"layer \d+: ([0-9.]+)s", text)]
    return {
        "cmd": " ".join(cmd[2:]),
        "rc": os.waitstatus_to_exitcode(status),
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(usage["maxrss_kb"] / 1024),
        "layer_seconds": layers,
        "mean_layer_s": round(sum(layers) / len(layers), 2) if layers else None,
    }


def write_calib(ckpt: Path, nsamples: int, seqlen: int, path: Path) -> dict:
    """The token windows ``recoup compress CKPT --calib ptb --nsamples N --seqlen T`` calibrates on (its own
    function, at ``recoup compress``'s default seed and BOS policy), saved as an (N, T) tensor for the peer."""
    import dataclasses
    import hashlib

    import torch
    from transformers import AutoTokenizer

    from recoup.data.calibration import calibration_windows
    from recoup.recipe.jobs import CompressJob

    defaults = {f.name: f.default for f in dataclasses.fields(CompressJob)}
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    cal = calibration_windows(tok, "ptb", nsamples, seqlen, defaults["seed"], bos=defaults["bos"])
    ids = cal.input_ids.clone().to(torch.int64)
    torch.save(ids, path)
    sha = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
    return {"ids": str(path), "shape": list(ids.shape), "seed": cal.seed, "bos": cal.bos, "sha256_16": sha}


def peer_python(venv: str, version: str) -> tuple[Path | None, dict]:
    """llm-compressor's venv python (installed if missing) and its versions; (None, {"error": why}) if it fails."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from compress_vs_peer import ensure_peer  # benchmarks/compress_vs_peer.py: the peer's venv

    try:
        py = ensure_peer(Path(venv), torch.__version__.split("+")[0], version)
        probe = "import llmcompressor, torch, transformers; print('VERSIONS', llmcompressor.__version__, "
        probe += "torch.__version__, transformers.__version__)"
        out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, check=True).stdout
        versions = [ln.split()[1:] for ln in out.splitlines() if ln.startswith("VERSIONS ")][-1]
        return py, dict(zip(("llmcompressor", "torch", "transformers"), versions))
    except Exception as exc:  # noqa: BLE001  (any failure to install is recorded, never a crash of the run)
        why = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        return None, {"error": f"llm-compressor {version} not available in {venv}: {why}"}


def last_error(text: str) -> str:
    """The last line of a log that names an error (else its last non-empty line)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r"Error|Exception|Killed", ln)]
    return (errors or lines or ["(no output)"])[-1][:300]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="llama-3.2-1b")
    ap.add_argument(
        "--cells",
        default="wanda,rtn,eval",
        help="wanda, rtn, gptq (recoup compress; gptq: w4 g128), eval (of the wanda artifact), eora (recover "
        "--method eora --rank 32 of the rtn artifact, else the wanda one), peer-wanda, peer-rtn (the same two "
        "compressions by llm-compressor on the same calibration tokens)",
    )
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
    ap.add_argument(
        "--peer-venv", default="/work/wt/venvs/llmc", help="llm-compressor's own venv (created when missing)"
    )
    ap.add_argument("--peer-version", default="0.14.0.1", help="llmcompressor to install there")
    args = ap.parse_args()
    work = Path(args.work)
    cells = args.cells.split(",")
    known = (*RECIPES, "eval", "eora", *PEER_RECIPES)
    unknown = [c for c in cells if c not in known]
    if unknown:
        sys.exit(f"unknown cell(s) {unknown}; known: {', '.join(known)}")
    peer_py, peer_info = (None, {})
    if any(c in PEER_RECIPES for c in cells):
        peer_py, peer_info = peer_python(args.peer_venv, args.peer_version)
        print(f"llm-compressor: {peer_py or ''} {peer_info}", flush=True)
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
        for recipe in (r for r in RECIPES if r in cells):
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
        peer_cells = [c for c in PEER_RECIPES if c in cells]
        calib = None
        if peer_cells and peer_py is not None:
            try:
                calib = write_calib(ckpt, args.nsamples, args.seqlen, work / f"{shape}-calib-ptb.pt")
            except Exception as exc:  # noqa: BLE001
                peer_info = {**peer_info, "error": f"calibration windows not written: {exc}".splitlines()[0]}
        for name in peer_cells:
            recipe, peer_recipe = PEER_RECIPES[name]
            key = f"compress {recipe} llm-compressor"
            if peer_py is None or calib is None:
                cell = {"rc": None, "error": peer_info.get("error", "llm-compressor not available")}
            else:
                cmd = [
                    str(peer_py),
                    str(PEER_WORKER),
                    "--model-dir",
                    str(ckpt),
                    "--calib",
                    calib["ids"],
                    "--recipe",
                    peer_recipe,
                    "--no-save",
                ]
                log = work / f"{shape}-{name}.log"
                cell = {**measure(cmd, log), "cmd": " ".join(cmd)}
                del cell["layer_seconds"], cell["mean_layer_s"]
                text = log.read_text(errors="replace")
                found = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
                if cell["rc"] == 0 and found:
                    res = json.loads(found[-1][len("RESULT ") :])
                    cell.update(
                        {
                            "oneshot_s": round(res["compress_s"], 1),
                            "oneshot_cpu_s": round(res["compress_cpu_s"], 1),
                            "load_s": round(res["load_s"], 1),
                            "load": "whole model, AutoModelForCausalLM.from_pretrained",
                            "model_dtype": res["model_dtype"],
                            "quantized_linears": res["quantized_linears"],
                        }
                    )
                else:
                    rc = cell["rc"]
                    why = f"killed by signal {-rc}" if rc is not None and rc < 0 else last_error(text)
                    cell["error"] = f"rc {rc}: {why}"
                cell["calibration_ids"] = calib
            cell.update({k: v for k, v in peer_info.items() if k != "error"})
            cell["peer_recipe"] = peer_recipe
            result["cells"][key] = cell
            rows.append((shape, key, cell))
            if "error" in cell:
                print(f"{shape:14s} {key}: FAILED {cell['error']}", flush=True)
            else:
                print(
                    f"{shape:14s} {key} rc={cell['rc']} peak RSS {cell['peak_rss_mb']:7d} MB  wall "
                    f"{cell['wall_s']:7.1f} s  (oneshot {cell['oneshot_s']} s, {cell['model_dtype']})",
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
        if "eora" in cells:
            src = next((a for a in (work / f"{shape}-rtn-lazy", work / f"{shape}-wanda-lazy") if a.is_dir()), None)
            for mode in ("lazy", "eager") if args.eager else ("lazy",):
                if src is None:
                    cell = {"rc": None, "error": "no rtn or wanda artifact of this run (add the rtn cell)"}
                else:
                    cmd = recoup + [
                        "recover",
                        str(src),
                        "--method",
                        "eora",
                        "--rank",
                        "32",
                        "--calib",
                        "ptb",
                        "--nsamples",
                        str(args.nsamples),
                        "--seqlen",
                        str(args.seqlen),
                        "--out",
                        str(work / f"{shape}-eora-{mode}"),
                        "--force",
                        "--lazy" if mode == "lazy" else "--no-lazy",
                    ]
                    cell = {**measure(cmd, work / f"{shape}-eora-{mode}.log"), "artifact": src.name}
                key = f"recover eora r32 {mode}"
                result["cells"][key] = cell
                rows.append((shape, key, cell))
                print(f"{shape:14s} {key}: {cell.get('error') or cell['peak_rss_mb']} MB", flush=True)
        prior = OUT / f"{shape}.json"
        if args.merge and prior.is_file():  # cells measured by another run of the same shape are kept
            result["cells"] = {**json.loads(prior.read_text()).get("cells", {}), **result["cells"]}
        prior.write_text(json.dumps(result, indent=1))
        if not args.keep:
            for art in work.glob(f"{shape}-*-*"):
                if art.is_dir():
                    shutil.rmtree(art, ignore_errors=True)
    print(f"\n{'shape':14s} {'cell':31s} {'peak RSS MB':>12s} {'wall s':>8s} {'s/layer':>8s}")
    for shape, name, cell in rows:
        if "error" in cell:
            print(f"{shape:14s} {name:31s} failed: {cell['error']}")
            continue
        print(
            f"{shape:14s} {name:31s} {cell['peak_rss_mb']:12d} {cell['wall_s']:8.1f} "
            f"{cell.get('mean_layer_s') or '':>8}"
        )


if __name__ == "__main__":
    main()
