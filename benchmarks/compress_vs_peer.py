"""recoup vs llm-compressor on identical model, calibration windows and grids: perplexity and wall-time ratios.

llm-compressor runs in its own virtual environment (never a dependency of recoup), created and
installed by this script when missing: ``python3 -m venv VENV``, ``pip install torch==TORCH`` first (so
the local CPU/CUDA wheel of the same torch is taken), then ``llmcompressor==VERSION``. For each recipe:

1. recoup compresses the model in a fresh process on the calibration windows (N x T PTB-train, seed 0)
   and PTB-test perplexity is measured (GPTQ protocol, windows of --ppl-seqlen, the first --limit).
2. llm-compressor (benchmarks/compress_peer_worker.py, in its venv) compresses the same model on the
   *same token windows* (saved tensor, no shuffling) with the modifiers of the same name at their
   defaults and the same grid (bits, group size, symmetric), and saves its weights dequantized; a fresh
   recoup process loads them into the model and measures perplexity with the same evaluator.

Times are the compression call only (model load and evaluation excluded), wall and process CPU seconds,
with the load average. Prints a table and writes JSON.

    python benchmarks/compress_vs_peer.py --recipes gptq-w4g64,sparsegpt-50,wanda-50 --nsamples 128 --seqlen 512 \\
        --limit 16 --json benchmarks/results/compress_vs_peer/sparsegpt_gptq_wanda_128x512.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPES: dict[str, dict] = {
    "gptq-w4g64": {"method": "gptq", "bits": 4, "group_size": 64},
    "gptq-w3g64": {"method": "gptq", "bits": 3, "group_size": 64},
    "gptq-w4g64-mse": {"method": "gptq", "bits": 4, "group_size": 64, "scale_search": "mse"},
    "gptq-w3g64-mse": {"method": "gptq", "bits": 3, "group_size": 64, "scale_search": "mse"},
    "sparsegpt-50": {"method": "sparsegpt", "sparsity": 0.5},
    # recoup's other order (GPTQ's; one forward per layer); the peer has only its reference order: --only recoup
    "sparsegpt-50-true-seq": {"method": "sparsegpt", "sparsity": 0.5, "true_sequential": True},
    # GPTQ in the SparseGPT reference's order (every group's Hessian from the dense layer): --only recoup
    "gptq-w4g64-dense-order": {"method": "gptq", "bits": 4, "group_size": 64, "true_sequential": False},
    "sparsegpt-2:4": {"method": "sparsegpt", "pattern": "2:4"},
    "wanda-50": {"method": "wanda", "sparsity": 0.5},
    "awq-w4g64": {"method": "awq", "bits": 4, "group_size": 64},
    "awq-w3g64": {"method": "awq", "bits": 3, "group_size": 64},
    # AWQ's scales, then GPTQ's rounding (recoup's rounding=gptq; llm-compressor: AWQModifier then GPTQModifier)
    "awq-gptq-w3g64": {"method": "awq", "bits": 3, "group_size": 64, "rounding": "gptq"},
    "sparsegpt-50+w4g64": {"method": "sparsegpt", "sparsity": 0.5, "bits": 4, "group_size": 64},
}


def ensure_peer(venv: Path, torch_version: str, version: str) -> Path:
    """The peer venv's python, creating the venv and installing torch then llm-compressor if needed."""
    py = venv / "bin" / "python"
    probe = [str(py), "-c", "import llmcompressor, torch; print(llmcompressor.__version__, torch.__version__)"]
    if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return py
    print(f"installing llm-compressor {version} into {venv} (torch {torch_version} first)", flush=True)
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", f"torch=={torch_version}"], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", f"llmcompressor=={version}"], check=True)
    subprocess.run(probe, check=True)
    return py


def _result(proc: subprocess.CompletedProcess, what: str) -> dict:
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{what} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def side(args: argparse.Namespace) -> dict:
    """In a fresh process: recoup compresses (or loads the peer's weights), then perplexity and checks."""
    import torch

    from recoup.artifact import load_model
    from recoup.artifact.report import peak_rss_mb
    from recoup.compress import CompressConfig, compress
    from recoup.data.calibration import Calibration
    from recoup.evaluate.perplexity import perplexity
    from recoup.model.anatomy import anatomy

    loaded = load_model(args.model)
    row: dict = {}
    if args.peer_weights:
        state = torch.load(args.peer_weights)
        own = loaded.model.state_dict()
        missing = [k for k in own if k not in state]
        # Only the compressed linears may differ from the dense model: anything else the peer changed (an
        # embedding, a tied head, a norm) would be measured as part of its method. Listed, and flagged below.
        targets = {id(m) for _, m in anatomy(loaded.model).iter_linears()}
        target_keys = {f"{n}.weight" for n, m in loaded.model.named_modules() if id(m) in targets}
        row["peer_changed_outside_targets"] = [
            k
            for k, v in state.items()
            if k in own and k not in target_keys and not torch.equal(v.to(own[k].dtype), own[k])
        ]
        loaded.model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        row["peer_missing_keys"] = missing
    else:
        ids = torch.load(args.calib_ids)
        cal = Calibration(input_ids=ids, corpus="ptb", split="train", seqlen=ids.shape[1], seed=args.seed)
        config = CompressConfig.from_dict(
            {**RECIPES[args.side_recipe], "batch_size": args.batch_size}
        )  # None: recoup's default
        t0, c0 = time.time(), time.process_time()
        rep = compress(loaded, config, cal)
        row.update(
            {
                "compress_s": time.time() - t0,
                "compress_cpu_s": time.process_time() - c0,
                "peak_rss_mb": peak_rss_mb(),
                "batch_size": rep.config["batch_size"],
            }
        )
    anat = anatomy(loaded.model)
    ws = [anat.weight_matrix(m) for _, m in anat.iter_linears()]
    row["zero_fraction"] = float(sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws))
    res = perplexity(loaded.model, loaded.tokenizer, "ptb", "test", seqlen=args.ppl_seqlen, limit=args.limit)
    row.update({"ppl": res.ppl, "ppl_windows": res.windows})
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated: {', '.join(RECIPES)}")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ppl-seqlen", type=int, default=2048)
    p.add_argument("--limit", type=int, default=16)
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="recoup's calibration windows per forward (default: recoup's own, 1 or 8 by its path)",
    )
    p.add_argument("--peer-batch-size", type=int, default=1, help="llm-compressor's oneshot batch_size (its default 1)")
    p.add_argument("--peer-venv", default="/work/wt/venvs/llmc")
    p.add_argument("--peer-version", default="0.14.0.1")
    p.add_argument("--torch-version", default=None, help="torch to pin in the peer venv (default: this one's)")
    p.add_argument("--only", choices=("both", "recoup", "peer"), default="both")
    p.add_argument("--json", default="benchmarks/results/compress_vs_peer/compress_vs_peer.json")
    # internal: one side in a fresh process
    p.add_argument("--side-recipe", help=argparse.SUPPRESS)
    p.add_argument("--calib-ids", help=argparse.SUPPRESS)
    p.add_argument("--peer-weights", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.side_recipe or args.peer_weights:
        print("RESULT " + json.dumps(side(args)), flush=True)
        return 0
    names = [n for n in args.recipes.split(",") if n]
    bad = [n for n in names if n not in RECIPES]
    if bad:
        sys.exit(f"unknown recipe(s) {bad}; known: {', '.join(RECIPES)}")

    import torch

    from recoup.artifact import load_model
    from recoup.data.calibration import calibration_windows

    peer_py = None
    if args.only != "recoup":
        peer_py = ensure_peer(
            Path(args.peer_venv), args.torch_version or torch.__version__.split("+")[0], args.peer_version
        )
    loaded = load_model(args.model)
    cal = calibration_windows(loaded.tokenizer, "ptb", args.nsamples, args.seqlen, args.seed)
    work = Path(tempfile.mkdtemp(prefix="recoup-vs-peer-"))
    torch.save(cal.input_ids.clone(), work / "calib.pt")
    common = [
        "--model",
        args.model,
        "--seed",
        str(args.seed),
        "--ppl-seqlen",
        str(args.ppl_seqlen),
        "--limit",
        str(args.limit),
    ] + (["--batch-size", str(args.batch_size)] if args.batch_size else [])
    env = {**os.environ, "TQDM_DISABLE": "1"}
    out_path = Path(args.json)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        row: dict = {"recipe": name, "load_avg_start": os.getloadavg()}
        # A side that fails is recorded with its error and the run goes on: the other recipes' results stand.
        if args.only != "peer":
            proc = subprocess.run(
                [sys.executable, __file__, "--side-recipe", name, "--calib-ids", str(work / "calib.pt"), *common],
                capture_output=True,
                text=True,
                env=env,
            )
            try:
                row["recoup"] = _result(proc, f"recoup {name}")
            except RuntimeError as exc:
                row["recoup"] = {"error": str(exc)}
                print(exc, file=sys.stderr, flush=True)
            print(json.dumps({"recipe": name, "recoup": row["recoup"]}), flush=True)  # kept if the peer never ends
            out_path.write_text(json.dumps({"settings": vars(args), "results": [*rows, row]}, indent=1))
        if peer_py is not None:
            cmd = [
                str(peer_py),
                str(HERE / "compress_peer_worker.py"),
                "--model-dir",
                str(loaded.path),
                "--calib",
                str(work / "calib.pt"),
                "--recipe",
                name,
                "--out",
                str(work / f"{name}.pt"),
                "--batch-size",
                str(args.peer_batch_size),
            ]
            if RECIPES[name].get("sym") is False:
                cmd.append("--asym")
            try:
                peer = _result(subprocess.run(cmd, capture_output=True, text=True, env=env), f"llm-compressor {name}")
                proc = subprocess.run(
                    [sys.executable, __file__, "--peer-weights", str(work / f"{name}.pt"), *common],
                    capture_output=True,
                    text=True,
                    env=env,
                )
                row["peer"] = {**peer, **_result(proc, f"scoring llm-compressor's {name}")}
            except RuntimeError as exc:
                row["peer"] = {"error": str(exc)}
                print(exc, file=sys.stderr, flush=True)
            (work / f"{name}.pt").unlink(missing_ok=True)
        if "ppl" in row.get("recoup", {}) and "ppl" in row.get("peer", {}):
            row["ppl_ratio"] = row["recoup"]["ppl"] / row["peer"]["ppl"]
            row["time_ratio"] = row["recoup"]["compress_s"] / row["peer"]["compress_s"]
            row["cpu_ratio"] = row["recoup"]["compress_cpu_s"] / row["peer"]["compress_cpu_s"]
        row["load_avg_end"] = os.getloadavg()
        rows.append(row)
        print(json.dumps(row), flush=True)
        out_path.write_text(json.dumps({"settings": vars(args), "results": rows}, indent=1))

    print(
        f"\ncalibration {args.nsamples} x {args.seqlen} PTB-train (seed {args.seed}); PTB-test perplexity on "
        f"{args.limit} windows of {args.ppl_seqlen}"
    )
    print(
        "| recipe | ppl recoup / peer | ratio | compress s recoup / peer | ratio | CPU s ratio | zeros r / p |\n"
        "|---|---|---:|---|---:|---:|---|"
    )
    for r in rows:
        a, b = r.get("recoup", {}), r.get("peer", {})
        f = lambda d, k, fmt: format(d[k], fmt) if k in d else "-"  # noqa: E731
        print(
            f"| {r['recipe']} | {f(a, 'ppl', '.2f')} / {f(b, 'ppl', '.2f')} | {f(r, 'ppl_ratio', '.3f')} | "
            f"{f(a, 'compress_s', '.0f')} / {f(b, 'compress_s', '.0f')} | {f(r, 'time_ratio', '.2f')} | "
            f"{f(r, 'cpu_ratio', '.2f')} | {f(a, 'zero_fraction', '.3f')} / {f(b, 'zero_fraction', '.3f')} |"
        )
    for r in rows:
        changed = r.get("peer", {}).get("peer_changed_outside_targets") or []
        if RECIPES[r["recipe"]]["method"] == "awq":
            # AWQ folds its inverse scales into the op before each group (a norm, or v_proj / up_proj, which are
            # compressed linears anyway): changed norms are the method, not a difference between the two sides.
            mod = lambda k: k.rsplit(".", 2)[-2]  # noqa: E731  (input_layernorm, final_layer_norm, ln_1, ...)
            changed = [k for k in changed if "norm" not in mod(k) and not mod(k).startswith("ln_")]
        if changed:
            print(
                f"WARNING {r['recipe']}: the peer changed tensors outside the compressed linears "
                f"({', '.join(changed[:4])}); its numbers are not comparable"
            )
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
