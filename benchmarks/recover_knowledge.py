"""The knowledge-recovery study: what each recovery without task data wins back on a compressed model.

Rows (``--rows``): ``dense`` (the artifact's source), ``compressed`` (the artifact alone), ``eora:R`` (EoRA
rank R, training-free), ``soft-prompt:OBJ`` (a soft prompt trained on generic PTB text with objective
lm | kd | lm+kd; the objective key must exist in the soft prompt's config). Columns: PTB-test perplexity
(``--ppl-windows`` x 2048), ARC-Easy acc / acc_norm (``--arc`` seeded examples, 0 = all 570), SciQ acc / acc_norm
on the held-out part of its seeded hash split (``--sciq`` first held-out examples; the same split the
task-trained recoveries hold out), extra parameters, fit seconds; the gap closed vs compressed -> dense.

    python benchmarks/recover_knowledge.py --artifact /work/wt/eora-art/8x --rows dense,compressed,eora:8,eora:32 \\
        --out benchmarks/results/recover_knowledge

Each row is written to ``<out>/rows/<row>.json`` as soon as it is measured (a rerun skips finished rows),
then ``<out>/recover_knowledge.json``, ``recover_knowledge.md`` and ``recover_knowledge.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch


def fit_row(row: str, args, workdir: Path) -> tuple[str | None, dict]:
    """Fit the recovery of ``row`` on the artifact; returns (its directory or None, fit record)."""
    from recoup.recipe.jobs import RecoverJob
    from recoup.runs.stages import recover

    if row in ("dense", "compressed"):
        return None, {"parameters": 0, "fit_seconds": 0.0}
    method, _, arg = row.partition(":")
    out = workdir / row.replace(":", "-")
    if method == "eora":
        flat = {"method": "eora", "rank": int(arg), "calib": args.calib, "nsamples": args.nsamples,
                "seqlen": args.calib_seqlen}
    elif method == "soft-prompt":
        flat = {"method": "soft-prompt", "data": "ptb", "steps": args.prompt_steps}
        if arg:
            flat["objective"] = arg
    else:
        raise SystemExit(f"unknown row '{row}'")
    started = time.time()
    summary = recover(RecoverJob.from_flat({**flat, "model": args.artifact, "out": str(out), "force": True}))
    return str(out), {"parameters": summary["parameters"], "fit_seconds": round(time.time() - started, 1),
                      "config": summary["config"]}


def evaluate_row(row: str, recovery: str | None, args) -> dict:
    from recoup.artifact import load_model
    from recoup.recipe.jobs import EvalJob
    from recoup.recover.methods import load_recovery
    from recoup.recover.task_data import split_task
    from recoup.runs.compare_recovery import score_heldout
    from recoup.runs.stages import evaluate

    model = args.dense if row == "dense" else args.artifact
    started = time.time()
    limits = {"ppl:ptb": args.ppl_windows, "arc_easy": args.arc or None}
    res = evaluate(EvalJob.from_flat({"model": model, "tasks": ["ppl:ptb", "arc_easy"], "limits": limits,
                                      "seqlen": 2048, "seed": args.seed, "recovery": recovery}))["results"]
    split = split_task("sciq", 0.3, args.seed)
    loaded = load_model(model)
    rec = load_recovery(recovery) if recovery else None
    net = rec.apply(loaded.model) if rec is not None else loaded.model
    sciq = score_heldout(net, loaded.tokenizer, split.heldout[:args.sciq] if args.sciq else split.heldout, rec)
    return {"ppl_ptb": res["ppl:ptb"]["ppl"], "ppl_windows": res["ppl:ptb"]["windows"],
            "arc_easy_acc": res["arc_easy"]["acc"], "arc_easy_acc_norm": res["arc_easy"]["acc_norm"],
            "arc_easy_n": res["arc_easy"]["n"], "sciq_heldout_acc": sciq["acc"], "sciq_heldout_acc_norm": sciq["acc_norm"],
            "sciq_heldout_n": sciq["n"], "eval_seconds": round(time.time() - started, 1)}


COLUMNS = [("ppl_ptb", "PTB ppl", True), ("arc_easy_acc", "ARC-E acc", False),
           ("arc_easy_acc_norm", "ARC-E acc_norm", False), ("sciq_heldout_acc", "SciQ acc", False),
           ("sciq_heldout_acc_norm", "SciQ acc_norm", False)]


def gap_closed(value: float, comp: float, dense: float, lower_better: bool) -> float | None:
    gap = (comp - dense) if lower_better else (dense - comp)
    if abs(gap) < 1e-9:
        return None
    return ((comp - value) if lower_better else (value - comp)) / gap


def markdown(rows: dict[str, dict], header: str) -> str:
    lines = [header, "", "| row | extra params | fit s | " + " | ".join(c[1] for c in COLUMNS) + " |",
             "|---" * (3 + len(COLUMNS)) + "|"]
    dense, comp = rows.get("dense"), rows.get("compressed")
    for name, r in rows.items():
        cells = []
        for key, _, lower in COLUMNS:
            cell = f"{r[key]:.2f}" if key == "ppl_ptb" else f"{r[key]:.3f}"
            if dense and comp and name not in ("dense", "compressed"):
                g = gap_closed(r[key], comp[key], dense[key], lower)
                cell += f" ({100 * g:+.0f}% gap)" if g is not None else ""
            cells.append(cell)
        lines.append(f"| {name} | {r['parameters']:,} | {r['fit_seconds']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, label, _) in zip(axes, [COLUMNS[0], COLUMNS[1], COLUMNS[3]]):
        names = list(rows)
        ax.bar(range(len(names)), [rows[n][key] for n in names], color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--dense", default=None, help="dense model (default: the artifact's recorded source)")
    ap.add_argument("--rows", default="dense,compressed,eora:8,eora:32,eora:128")
    ap.add_argument("--calib", default="ptb")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--prompt-steps", type=int, default=80)
    ap.add_argument("--ppl-windows", type=int, default=8)
    ap.add_argument("--arc", type=int, default=250, help="seeded ARC-Easy examples (0: all 570)")
    ap.add_argument("--sciq", type=int, default=200, help="first SciQ held-out examples (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report-only", action="store_true", help="table and plot from the rows already measured")
    ap.add_argument("--out", default="benchmarks/results/recover_knowledge")
    ap.add_argument("--workdir", default="/tmp/recover_knowledge", help="where the fitted recoveries go (large)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from recoup.artifact import load_model

    if args.dense is None:
        src = load_model(args.artifact).manifest["source"]
        args.dense = src.get("path") or src["model"]
    out = Path(args.out)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir)
    rows: dict[str, dict] = {}
    for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
        done = out / "rows" / f"{row.replace(':', '-')}.json"
        if done.is_file():
            rows[row] = json.loads(done.read_text())
            print(f"{row}: cached {done}", flush=True)
            continue
        if args.report_only:
            print(f"{row}: not measured", flush=True)
            continue
        recovery, fitted = fit_row(row, args, workdir)
        rows[row] = {**fitted, **evaluate_row(row, recovery, args)}
        done.write_text(json.dumps(rows[row], indent=1))
        print(f"{row}: {json.dumps(rows[row])}", flush=True)
    setup = {"artifact": args.artifact, "dense": args.dense, "eora_calibration": f"{args.calib} {args.nsamples} x "
             f"{args.calib_seqlen}", "ppl": f"PTB test, {args.ppl_windows} x 2048", "arc_easy": args.arc or "all",
             "sciq": f"held-out part (fraction 0.3, seed {args.seed}), first {args.sciq or 'all'}",
             "threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
             "host": platform.node(), "torch": torch.__version__, "load_avg_at_end": os.getloadavg()}
    (out / "recover_knowledge.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
    header = (f"Recovery without task data on `{args.artifact}` ({setup['ppl']}; ARC-Easy {setup['arc_easy']} "
              f"seeded examples; SciQ {setup['sciq']}). Gap closed = share of the compressed -> dense gap won back.")
    table = markdown(rows, header)
    (out / "recover_knowledge.md").write_text(table)
    plot(rows, out / "recover_knowledge.png")
    print(table)


if __name__ == "__main__":
    main()
