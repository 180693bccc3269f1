"""Benchmark every compression method on one model: wall time, peak RSS and PTB perplexity.

Each recipe runs in a fresh subprocess (so peak RSS is that recipe's own), loads the model,
compresses it with calibration windows from PTB-train, checks the properties the recipe claims
(exact sparsity, N:M, every weight on its grid), then measures PTB-test perplexity (GPTQ protocol).
Existing artifacts (``--artifacts DIR ...``) are evaluated too, with time and memory from their
manifests. Prints a table and writes JSON.

    python benchmarks/compress.py --nsamples 128 --seqlen 512 --ppl-seqlen 2048 --limit 8 --json out.json
    python benchmarks/compress.py --recipes sparsegpt-50+w4g64 --no-ppl --flops   # achieved FLOP/s vs torch.mm
    python benchmarks/compress.py --obs-timing            # OBS time per LLaMA-7B-shaped layer (CUDA if present)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

RECIPES: dict[str, dict] = {
    "dense": {},
    "magnitude-50": {"method": "magnitude", "sparsity": 0.5},
    "wanda-50": {"method": "wanda", "sparsity": 0.5},
    "sparsegpt-50": {"method": "sparsegpt", "sparsity": 0.5},
    "magnitude-2:4": {"method": "magnitude", "pattern": "2:4"},
    "wanda-2:4": {"method": "wanda", "pattern": "2:4"},
    "sparsegpt-2:4": {"method": "sparsegpt", "pattern": "2:4"},
    "rtn-w3g64": {"method": "rtn", "bits": 3, "group_size": 64},
    "rtn-w3g64-mse": {"method": "rtn", "bits": 3, "group_size": 64, "scale_search": "mse"},
    "gptq-w3g64-mse": {"method": "gptq", "bits": 3, "group_size": 64, "scale_search": "mse"},
    "gptq-w4g64-mse": {"method": "gptq", "bits": 4, "group_size": 64, "scale_search": "mse"},
    "gptq-w3g64": {"method": "gptq", "bits": 3, "group_size": 64},
    "gptq-w4g64": {"method": "gptq", "bits": 4, "group_size": 64},
    "gptq-w4g64-noact": {"method": "gptq", "bits": 4, "group_size": 64, "act_order": False, "static_groups": False},
    "awq-w4g64": {"method": "awq", "bits": 4, "group_size": 64},
    "awq-w3g64": {"method": "awq", "bits": 3, "group_size": 64},
    "sparsegpt-50+w4g64": {"method": "sparsegpt", "sparsity": 0.5, "bits": 4, "group_size": 64},
}


def check_properties(loaded, config, report) -> dict:
    """Exact zero fraction, N:M and grid membership of every targeted linear, measured on the weights."""
    from recoup.artifact.fingerprint import compression_fingerprint
    from recoup.compress.masks import is_nm
    from recoup.model.anatomy import anatomy

    fp = compression_fingerprint(loaded.model, report.to_dict(), report.qparams)
    out = {"zero_fraction": fp["sparsity"], "all_on_grid": fp["all_on_grid"]}
    if config.nm:
        out["nm_ok"] = all(
            is_nm(anatomy(loaded.model).weight_matrix(m), *config.nm) for _, m in anatomy(loaded.model).iter_linears()
        )
    return out


def run_one(name: str, args: argparse.Namespace) -> dict:
    """Compress + evaluate one recipe in this process; returns a result row."""
    from recoup.artifact import load_model
    from recoup.artifact.report import peak_rss_mb
    from recoup.compress import CompressConfig, compress
    from recoup.compress.methods import METHODS
    from recoup.data.calibration import calibration_windows
    from recoup.evaluate.perplexity import perplexity

    row: dict = {"recipe": name}
    if name.startswith("artifact:"):
        path = name.split(":", 1)[1]
        loaded = load_model(path)
        m = loaded.manifest
        row.update(
            {
                "recipe": f"{m['recipe']['method']} {Path(path).name}",
                "compress_s": m["seconds"],
                "peak_rss_mb": m["peak_rss_mb"],
                "zero_fraction": m["summary"]["sparsity"],
                "calibration": m["calibration"],
            }
        )
        from recoup.artifact.fingerprint import compression_fingerprint

        row["all_on_grid"] = compression_fingerprint(loaded.model, m)["all_on_grid"]
    else:
        loaded = load_model(args.model)
        if RECIPES[name]:
            config = CompressConfig.from_dict(RECIPES[name])
            cal = None
            if METHODS.get(config.method).stats != "none":
                cal = calibration_windows(loaded.tokenizer, "ptb", args.nsamples, args.seqlen, args.seed)
            from compress_flops import FlopCounter, matmul_rate, obs_flops

            counter = FlopCounter()
            t0, c0 = time.time(), time.process_time()
            with counter.watch(loaded.model) if args.flops else contextlib.nullcontext():
                report = compress(loaded, config, cal)
            row["compress_s"] = time.time() - t0
            row["compress_cpu_s"] = time.process_time() - c0  # CPU seconds of every thread: less load-sensitive
            row["load_avg"] = os.getloadavg()
            if args.flops:  # achieved FLOP/s against torch.mm's rate at the run's own shapes
                flops = {
                    "linear": counter.linear,
                    "attention": counter.attention,
                    "stats": counter.stats,
                    "obs": obs_flops(report),
                }
                rate = matmul_rate(counter.mm_shapes)
                achieved = sum(flops.values()) / row["compress_s"]
                row.update(
                    {
                        "gflop": {k: v / 1e9 for k, v in flops.items()},
                        "achieved_gflops": achieved / 1e9,
                        "matmul_gflops": rate / 1e9,
                        "fraction_of_matmul": achieved / rate,
                    }
                )
            row["peak_rss_mb"] = peak_rss_mb()
            row["calibration"] = cal.protocol if cal is not None else None
            row.update(check_properties(loaded, config, report))
        else:
            row.update({"compress_s": 0.0, "peak_rss_mb": peak_rss_mb(), "zero_fraction": 0.0})
    if args.no_ppl:
        row.update({"ppl": float("nan"), "peak_rss_mb_total": peak_rss_mb()})
        return row
    t0 = time.time()
    res = perplexity(loaded.model, loaded.tokenizer, "ptb", "test", seqlen=args.ppl_seqlen, limit=args.limit)
    row.update(
        {
            "ppl": res.ppl,
            "ppl_windows": res.windows,
            "ppl_tokens": res.tokens,
            "ppl_s": time.time() - t0,
            "peak_rss_mb_total": peak_rss_mb(),
        }
    )
    return row


def obs_timing(args: argparse.Namespace) -> list[dict]:
    """SparseGPT / GPTQ time per weight of LLaMA-7B layer shapes with random weights and Hessians."""
    import torch

    from recoup.artifact.grid import QuantGrid
    from recoup.compress.obs import obs_compress

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for shape in args.shapes:
        r, c = (int(v) for v in shape.split("x"))
        g = torch.Generator(device="cpu").manual_seed(0)
        w = torch.randn(r, c, generator=g).to(device)
        x = torch.randn(4 * c, c, generator=g).to(device)
        h = 2 / x.shape[0] * x.t() @ x
        flops = r * c * c + r * c * 128 + 4 / 3 * c**3  # lazy updates + in-block updates + Cholesky/inverse
        for name, kw in [("sparsegpt-50", {"sparsity": 0.5}), ("gptq-w4g128", {"grid": QuantGrid(4, True, 128)})]:
            if device == "cuda":  # warm up kernels and the allocator
                obs_compress(w[:64], h, **kw)
                torch.cuda.synchronize()
            t0 = time.time()
            obs_compress(w, h, **kw)
            if device == "cuda":
                torch.cuda.synchronize()
            dt = time.time() - t0
            rows.append(
                {
                    "method": name,
                    "shape": f"{r}x{c}",
                    "device": device,
                    "seconds": dt,
                    "gflop_est": flops / 1e9,
                    "gflops": flops / 1e9 / dt,
                }
            )
            print(
                f"{name:14s} {r}x{c} on {device}: {dt:.2f}s  (~{flops / 1e9:.0f} GFLOP, {flops / 1e9 / dt:.1f} GFLOP/s)"
            )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated: {', '.join(RECIPES)}")
    p.add_argument("--artifacts", nargs="*", default=[], help="also evaluate these artifact directories")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512, help="calibration window length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ppl-seqlen", type=int, default=2048)
    p.add_argument("--limit", type=int, default=None, help="at most N PTB-test perplexity windows")
    p.add_argument("--no-ppl", action="store_true", help="time the compression only (no perplexity)")
    p.add_argument(
        "--flops",
        action="store_true",
        help="count the run's FLOPs and time torch.mm at its shapes: achieved FLOP/s vs the matmul rate",
    )
    p.add_argument("--json", default="benchmarks/results/compress/compress.json")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--obs-timing", action="store_true", help="time the OBS update on LLaMA-7B layer shapes instead")
    p.add_argument("--shapes", nargs="*", default=["4096x4096", "11008x4096"])
    p.add_argument("--device", default=None, help="device for --obs-timing (default cuda if available)")
    args = p.parse_args()

    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args)), flush=True)
        return 0
    if args.obs_timing:
        rows = obs_timing(args)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"obs_timing": rows}, indent=1))
        return 0

    names = [n for n in args.recipes.split(",") if n] + [f"artifact:{a}" for a in args.artifacts]
    for n in names:
        if not n.startswith("artifact:") and n not in RECIPES:
            sys.exit(f"unknown recipe '{n}'; known: {', '.join(RECIPES)}")
    results = []
    passthrough = [
        "--model",
        args.model,
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
        "--seed",
        str(args.seed),
        "--ppl-seqlen",
        str(args.ppl_seqlen),
    ]
    if args.limit:
        passthrough += ["--limit", str(args.limit)]
    if args.no_ppl:
        passthrough.append("--no-ppl")
    if args.flops:
        passthrough.append("--flops")
    out_path = Path(args.json)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for n in names:
        proc = subprocess.run(
            [sys.executable, __file__, "--one", n, *passthrough],
            capture_output=True,
            text=True,
            env={**os.environ, "TQDM_DISABLE": "1"},
        )
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"{n}: FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        row = json.loads(line[-1][len("RESULT ") :])
        results.append(row)
        if "achieved_gflops" in row:
            parts = ", ".join(f"{k} {v:.0f}" for k, v in row["gflop"].items())
            print(
                f"{row['recipe']:24s} {sum(row['gflop'].values()):.0f} GFLOP ({parts}): "
                f"{row['achieved_gflops']:.1f} GFLOP/s achieved; torch.mm at the same shapes "
                f"{row['matmul_gflops']:.1f} GFLOP/s ({row['fraction_of_matmul']:.0%})",
                flush=True,
            )
        print(
            f"{row['recipe']:24s} ppl {row['ppl']:9.3f}  compress {row['compress_s']:7.1f}s  "
            f"peak RSS {row['peak_rss_mb']:6.0f} MiB  zeros {row.get('zero_fraction', 0):.4f}",
            flush=True,
        )
        out_path.write_text(json.dumps({"settings": vars(args), "results": results}, indent=1))

    print(
        f"\nPTB-test perplexity (seqlen {args.ppl_seqlen}, {'all' if not args.limit else args.limit} windows); "
        f"calibration {args.nsamples} x {args.seqlen} PTB-train windows, seed {args.seed}"
    )
    print(
        "| recipe | calibration | PTB ppl | compress time (s) | peak RSS (MiB) | zeros | checks |\n"
        "|---|---|---:|---:|---:|---:|---|"
    )
    for r in results:
        checks = []
        if r.get("all_on_grid") is not None:
            checks.append("on grid" if r["all_on_grid"] else "OFF GRID")
        if "nm_ok" in r:
            checks.append("N:M ok" if r["nm_ok"] else "N:M BROKEN")
        cal = r.get("calibration")
        cal = f"{cal['nsamples']}x{cal['seqlen']} {cal['corpus']}" if cal else "none"
        print(
            f"| {r['recipe']} | {cal} | {r['ppl']:.2f} | {r['compress_s']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r.get('zero_fraction', 0):.4f} | {', '.join(checks)} |"
        )
    print(f"wrote {out_path}")
    return 0 if args.no_ppl or math.isfinite(sum(r["ppl"] for r in results)) else 1


if __name__ == "__main__":
    sys.exit(main())
