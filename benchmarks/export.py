"""Benchmark `recoup export`: per artifact and format, disk size, export time, load time in the destination's
own loader, and PTB-test perplexity (GPTQ protocol, the same token windows) as the destination computes
it, against recoup's own number for the artifact. Prints a table and writes JSON.

Destinations: hf -> transformers; compressed-tensors -> transformers + compressed-tensors; gguf ->
transformers' GGUF reader, and llama.cpp itself when ``--llama-python`` names a Python with
``llama_cpp`` (llama-cpp-python) installed: it evaluates the same windows with logits for every token.

    python benchmarks/export.py --artifacts /path/8x /path/gptq --limit 16 --seqlen 2048 \
        --llama-python /work/wt/venvs/llamacpp/venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLAMA_CPP_NLL = r"""
import sys, json, math, numpy as np
from llama_cpp import Llama
path, ids_file, seqlen, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
windows = np.load(ids_file)
import time
t0 = time.perf_counter()
llm = Llama(model_path=path, n_ctx=seqlen, n_batch=512, logits_all=True, n_threads=threads, verbose=False)
load_s = time.perf_counter() - t0
total, count = 0.0, 0
for w in windows:
    llm.reset()
    llm.eval(w.tolist())
    logits = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)
    m = logits.max(1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(logits - m).sum(1)))
    total += float((lse - logits[np.arange(len(w) - 1), w[1:]]).sum())
    count += len(w) - 1
eval_s = time.perf_counter() - t0 - load_s
print(json.dumps({"nll": total / count, "tokens": count, "load_s": load_s, "eval_s": eval_s}))
"""


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def ppl_of(model, windows) -> tuple[float, float]:
    from recoup.evaluate.perplexity import perplexity_of_ids

    t0 = time.perf_counter()
    nll, _, _ = perplexity_of_ids(model, windows.reshape(-1), windows.shape[1], progress=False)
    return math.exp(nll), time.perf_counter() - t0


def load_destination(fmt: str, out: Path):
    import torch
    from transformers import AutoModelForCausalLM

    if fmt == "gguf":
        return AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.gguf", dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()


def run_artifact(art: Path, args: argparse.Namespace, work: Path) -> list[dict]:
    import numpy as np

    from recoup.artifact.export import ExportConfig, export
    from recoup.artifact.store import load_artifact
    from recoup.data.calibration import tokenize_corpus
    from recoup.data.corpora import load_corpus

    rows = []
    t0 = time.perf_counter()
    loaded = load_artifact(art)
    load_s = time.perf_counter() - t0
    ids = tokenize_corpus(loaded.tokenizer, load_corpus("ptb", "test"))
    n = min(args.limit, ids.numel() // args.seqlen)
    windows = ids[: n * args.seqlen].view(n, args.seqlen)
    ppl, ppl_s = ppl_of(loaded.model, windows)
    recipe = loaded.manifest.get("recipe") or {}
    base = {
        "artifact": str(art),
        "recipe": {k: recipe.get(k) for k in ("method", "sparsity", "bits", "group_size", "sym")},
        "calibration": loaded.manifest.get("calibration"),
        "windows": n,
        "seqlen": args.seqlen,
    }
    rows.append(
        {
            **base,
            "format": "recoup",
            "loader": "recoup load_artifact",
            "bytes": loaded.manifest["storage"]["bytes"],
            "export_s": None,
            "load_s": load_s,
            "ppl": ppl,
            "ppl_s": ppl_s,
        }
    )
    print(f"  recoup: ppl {ppl:.4f} ({ppl_s:.0f}s)", flush=True)
    recoup_ppl = ppl
    del loaded
    for fmt in args.formats:
        out = work / f"{art.name}-{fmt}"
        res = export(ExportConfig(source=str(art), format=fmt, out=str(out)))
        t0 = time.perf_counter()
        model = load_destination(fmt, out)
        load_s = time.perf_counter() - t0
        ppl, ppl_s = ppl_of(model, windows)
        del model
        loader = {
            "hf": "transformers",
            "compressed-tensors": "transformers + compressed-tensors",
            "gguf": "transformers GGUF reader",
        }[fmt]
        rows.append(
            {
                **base,
                "format": fmt,
                "loader": loader,
                "bytes": dir_bytes(out),
                "export_s": res["seconds"],
                "load_s": load_s,
                "ppl": ppl,
                "ppl_s": ppl_s,
                "ppl_rel_diff": abs(ppl - recoup_ppl) / recoup_ppl,
                "plan": res["plan"],
                "tensor_types": res.get("tensor_types"),
            }
        )
        print(f"  {fmt}: ppl {ppl:.4f} ({ppl_s:.0f}s), {dir_bytes(out) / 1e6:.1f} MB", flush=True)
        if fmt == "gguf" and args.llama_python:
            ids_file = work / "windows.npy"
            np.save(ids_file, windows.numpy().astype(np.int64))
            proc = subprocess.run(
                [
                    args.llama_python,
                    "-c",
                    LLAMA_CPP_NLL,
                    str(out / "model.gguf"),
                    str(ids_file),
                    str(args.seqlen),
                    str(args.threads),
                ],
                capture_output=True,
                text=True,
            )
            if proc.returncode:
                print(f"  llama.cpp failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
                rows.append({**base, "format": "gguf", "loader": "llama.cpp", "error": proc.stderr[-2000:]})
            else:
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                ppl = math.exp(r["nll"])
                rows.append(
                    {
                        **base,
                        "format": "gguf",
                        "loader": "llama.cpp (llama-cpp-python)",
                        "bytes": (out / "model.gguf").stat().st_size,
                        "export_s": res["seconds"],
                        "load_s": r["load_s"],
                        "ppl": ppl,
                        "ppl_s": r["eval_s"],
                        "ppl_rel_diff": abs(ppl - recoup_ppl) / recoup_ppl,
                    }
                )
                print(f"  gguf in llama.cpp: ppl {ppl:.4f} ({r['eval_s']:.0f}s)", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", nargs="+", required=True, help="recoup artifact directories")
    p.add_argument("--formats", nargs="+", default=["hf", "compressed-tensors", "gguf"])
    p.add_argument("--limit", type=int, default=16, help="PTB-test windows (default 16)")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--llama-python", default=None, help="a Python with llama_cpp installed (llama-cpp-python)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--json", default="benchmarks/results/export/export.json")
    args = p.parse_args()
    import transformers  # noqa: F401  (import time is not load time)
    from transformers import AutoModelForCausalLM  # noqa: F401

    rows = []
    with tempfile.TemporaryDirectory(prefix="recoup-export-bench-") as tmp:
        for art in args.artifacts:
            print(f"{art}:", flush=True)
            rows += run_artifact(Path(art), args, Path(tmp))
    print(
        f"\n{'artifact':<22} {'format':<20} {'loader':<34} {'MB':>7} {'export s':>9} {'load s':>7} "
        f"{'PTB ppl':>9} {'vs recoup':>10}"
    )
    for r in rows:
        if "error" in r:
            print(f"{Path(r['artifact']).name:<22} {r['format']:<20} {r['loader']:<34} failed")
            continue
        exp_s = f"{r['export_s']:.1f}" if r["export_s"] is not None else "-"
        diff = f"{r['ppl_rel_diff']:.2e}" if "ppl_rel_diff" in r else "-"
        print(
            f"{Path(r['artifact']).name:<22} {r['format']:<20} {r['loader']:<34} {r['bytes'] / 1e6:>7.1f} "
            f"{exp_s:>9} {r['load_s']:>7.1f} {r['ppl']:>9.4f} {diff:>10}"
        )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items()}
    settings["cpu_count"] = os.cpu_count()
    settings["loadavg_at_end"] = os.getloadavg()
    out.write_text(json.dumps({"settings": settings, "results": rows}, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
