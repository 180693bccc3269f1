"""Rebuild the README's results table and docs/results.md from benchmarks/results/.

    python benchmarks/report.py                  # rewrite both
    python benchmarks/report.py --check          # exit 1 if either differs from what the results give

Every figure in either page is read here from a JSON file under benchmarks/results/<benchmark>/ (each folder's
README.md holds the exact command, machine and date); nothing is typed in by hand. The README's table sits between
the markers ``<!-- results:start -->`` and ``<!-- results:end -->``; the rest of the README is left alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _load(rel: str) -> dict:
    return json.loads((RESULTS / rel).read_text(encoding="utf-8"))


def _link(rel: str, prefix: str) -> str:
    return f"[`{rel}`]({prefix}benchmarks/results/{rel})"


def _table(header: list[str], rows: list[list[str]], right: int = 1) -> list[str]:
    """Markdown table; columns from index ``right`` on are right-aligned."""
    align = ["---" if i < right else "---:" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


# ---- the knowledge-recovery study

STUDY = "recover_knowledge/recover_knowledge.json"
ROW_NAMES = {
    "dense": "dense",
    "compressed": "compressed, nothing attached",
    "soft-prompt:lm": "soft prompt (CTP), 20 tokens",
    "soft-prompt:kd": "soft prompt, distilled",
    "idp:kd": "IDP pool 4 x 20, distilled",
    "eora:8": "EoRA rank 8 (no training)",
    "eora:32": "EoRA rank 32 (no training)",
    "eora:128": "EoRA rank 128 (no training)",
    "lora:kd": "LoRA r32 distilled from dense",
    "lora:kd+eora": "LoRA r32 distilled, started from EoRA",
    "lora:task=sciq": "LoRA r32 trained on SciQ (reference)",
    "cpet:task=sciq": "CPET r32 trained on SciQ (reference)",
}
ARTIFACT_NAMES = {
    "8x": "8x: SparseGPT 50% + 4-bit g64",
    "gptq-w3g64": "GPTQ 3-bit g64",
    "sparsegpt-2of4": "SparseGPT 2:4",
}
TASKS = [("arc_easy", "ARC-E"), ("piqa", "PIQA"), ("sciq", "SciQ held-out")]


def _study_rows(artifact: str, names: list[str], gap: bool, ci: bool = True) -> list[list[str]]:
    study = _load(STUDY)["artifacts"][artifact]
    rows, analysis = study["rows"], study["analysis"]
    out = []
    for name in names:
        row, an = rows[name], analysis.get(name, {})
        pct = row.get("parameters_pct", 100.0 * row["parameters"] / row["base_parameters"])
        cells = [ROW_NAMES.get(name, name), f"{pct:.2f}%" if row["parameters"] else "0", f"{row['ppl_ptb']:.2f}"]
        if gap and name not in ("dense", "compressed") and an.get("ppl_ptb", {}).get("gap_closed") is not None:
            cells[-1] += f" ({100 * an['ppl_ptb']['gap_closed']:.0f}%)"
        for task, _ in TASKS:
            cell = f"{row[task]:.3f}"
            a = an.get(task, {})
            if name not in ("dense", "compressed") and "ci95" in a:
                lo, hi = a["ci95"]
                cell += f" ({a['delta']:+.3f} [{lo:+.3f}, {hi:+.3f}])" if ci else f" ({a['delta']:+.3f})"
            cells.append(cell)
        out.append(cells)
    return out


def _study_protocol() -> str:
    return _load(STUDY)["setup"]["protocol"]


# ---- compression against the reference implementation

PEER = "compress_vs_peer/sparsegpt_gptq_wanda_128x512.json"
PEER_NAMES = {"sparsegpt-50": "SparseGPT 50%", "gptq-w4g64": "GPTQ 4-bit g64", "wanda-50": "Wanda 50%"}
AWQ = "awq_w3/variants.json"
AWQ_PEER = "compress_vs_peer/awq_plus_gptq_w3g64_32x512_peer.json"


def _peer_rows() -> list[list[str]]:
    rows = []
    for r in _load(PEER)["results"]:
        a, b = r["recoup"], r["peer"]
        rows.append(
            [
                PEER_NAMES.get(r["recipe"], r["recipe"]),
                f"{a['ppl']:.2f}",
                f"{b['ppl']:.2f}",
                f"{a['compress_s']:.0f}",
                f"{b['compress_s']:.0f}",
                f"{r['time_ratio']:.2f}x",
            ]
        )
    return rows


def _awq_default() -> tuple[float, float]:
    """(recoup's AWQ + GPTQ at its defaults, llm-compressor's AWQ + GPTQ), w3 g64, 32 x 512, PTB 8 x 2048."""
    ours = next(r for r in _load(AWQ)["rows"] if r["current_default"] and r["recipe"].get("rounding") == "gptq")
    peer = _load(AWQ_PEER)["results"][0]["peer"]
    return ours["ppl"], peer["ppl"]


# ---- the README table


def readme_table(prefix: str = "") -> str:
    ex = _load(STUDY)["setup"]["examples"]
    lines = [
        "The bundled SmolLM2-135M-Instruct compressed 8x (SparseGPT 50% + 4-bit, group 64), then recovered; "
        "accuracy (delta against the compressed model), PTB perplexity (share of the gap closed):",
        "",
    ]
    header = ["", "extra parameters", "PTB ppl"] + [t for _, t in TASKS]
    lines += _table(
        header,
        _study_rows(
            "8x",
            ["dense", "compressed", "soft-prompt:lm", "eora:32", "lora:kd+eora", "cpet:task=sciq"],
            gap=True,
            ci=False,
        ),
        right=1,
    )
    lines += [
        "",
        f"PTB test 16 x 2048; ARC-Easy {ex['arc_easy']}, PIQA {ex['piqa']}, SciQ {ex['sciq']}; "
        f"confidence intervals and two more artifacts in [docs/results.md]({prefix}docs/results.md), "
        f"source {_link(STUDY, prefix)}.",
        "",
    ]
    lines += [
        "Compression against llm-compressor 0.14 at its defaults, same calibration windows (128 x 512 PTB-train) "
        "and grids, PTB-test 16 x 2048, one 2-core CPU:",
        "",
    ]
    lines += _table(
        ["method", "PTB recoup", "PTB llm-compressor", "seconds recoup", "seconds llm-compressor", "time ratio"],
        _peer_rows(),
    )
    ours, peer = _awq_default()
    lines += [
        "",
        f"AWQ + GPTQ at 3 bits (group 64, 32 x 512, PTB-test 8 x 2048): recoup {ours:.2f}, llm-compressor "
        f"{peer:.2f}. Sources: {_link(PEER, prefix)}, {_link(AWQ, prefix)}, {_link(AWQ_PEER, prefix)}; "
        f"every result: [docs/results.md]({prefix}docs/results.md).",
    ]
    return "\n".join(lines)


# ---- docs/results.md


def results_page() -> str:
    p = "../"
    out = [
        "# Results",
        "",
        "Generated by `python benchmarks/report.py` from `benchmarks/results/`; do not edit by hand. Each source "
        "folder's README.md gives the exact command, the machine and the date. Perplexities use the GPTQ protocol "
        "(non-overlapping windows of the test split, float32); accuracies are lm-eval's `acc`.",
        "",
    ]

    out += [
        "## Knowledge recovery without task data",
        "",
        f"Source: {_link(STUDY, p)} (tables with every column, latencies included: "
        f"[`recover_knowledge.md`]({p}benchmarks/results/recover_knowledge/recover_knowledge.md)). "
        f"{_study_protocol()}",
        "",
        "Cells: value (delta against the compressed model [95% paired bootstrap]); PTB: perplexity (share of the "
        "compressed -> dense gap closed).",
        "",
    ]
    header = ["row", "extra parameters", "PTB ppl"] + [t for _, t in TASKS]
    for artifact, rows in _load(STUDY)["artifacts"].items():
        out += [f"### {ARTIFACT_NAMES.get(artifact, artifact)}", ""]
        out += _table(header, _study_rows(artifact, list(rows["rows"]), gap=True)) + [""]

    out += [
        "## Compression against llm-compressor",
        "",
        f"Source: {_link(PEER, p)}. Same model, same saved calibration windows (128 x 512 PTB-train, seed 0) and "
        "grids on both sides, both scored by recoup's evaluator on PTB-test 16 x 2048; seconds are the "
        "compression call alone, both sides on the same 2-core CPU in one run.",
        "",
    ]
    out += _table(
        ["method", "PTB recoup", "PTB llm-compressor", "seconds recoup", "seconds llm-compressor", "time ratio"],
        _peer_rows(),
    ) + [""]
    by_step = "compress_vs_peer/sparsegpt_time_by_step_128x512.json"
    steps = _load(by_step)
    out += [
        f"SparseGPT's {steps['total_s']:.0f} s by step ({_link(by_step, p)}): "
        f"the dense layer's forward for the statistics {steps['observe_forward_s']:.0f} s, the Hessians "
        f"{steps['hessian_add_s']:.0f} s, the OBS update {steps['compress_groups_s']:.0f} s, the compressed "
        f"layer's forward {steps['propagate_s']:.0f} s.",
        "",
    ]

    out += ["## AWQ at 3 bits", "", f"Source: {_link(AWQ, p)}. {_load(AWQ)['protocol']}", ""]
    machines = _load(AWQ)["machines"]
    rows = [
        [r["what"], r["machine"], "yes" if r["current_default"] else "", f"{r['ppl']:.2f}"] for r in _load(AWQ)["rows"]
    ]
    ours, peer = _awq_default()
    rows.append(
        ["llm-compressor 0.14: AWQModifier then GPTQModifier (" + _link(AWQ_PEER, p) + ")", "B", "", f"{peer:.2f}"]
    )
    out += _table(["variant", "machine", "default", "PTB ppl"], rows, right=3) + [""]
    out += [f"- machine {k}: {v}" for k, v in machines.items()] + [""]

    scale_search = _load("scale_search/w3g64_32x512.json")
    out += [
        "## Quantization range search",
        "",
        f"Source: {_link('scale_search/w3g64_32x512.json', p)}. 3-bit, group 64, symmetric; calibration 32 x 512 "
        "PTB-train, PTB-test 8 x 2048.",
        "",
    ]
    out += _table(["recipe", "PTB ppl"], [[r["recipe"], f"{r['ppl']:.2f}"] for r in scale_search["results"]]) + [""]

    out += [
        "## Zero-shot accuracy of the dense bundled model, full validation splits",
        "",
        f"Sources: {_link('zeroshot_full/arc_easy_piqa.json', p)}, {_link('zeroshot_full/other_tasks.json', p)}, "
        f"{_link('zeroshot_full/hellaswag_batch64.json', p)} (one H100); "
        f"{_link('zeroshot_full/hellaswag_cpu.json', p)} (CPU) gives the same HellaSwag figures.",
        "",
    ]
    rows = []
    for rel in (
        "zeroshot_full/arc_easy_piqa.json",
        "zeroshot_full/other_tasks.json",
        "zeroshot_full/hellaswag_batch64.json",
    ):
        for task, r in _load(rel)["results"].items():
            norm = f"{r['acc_norm']:.4f}" if "acc_norm" in r else ""
            rows.append([task, r["protocol"]["split"], str(r["n"]), f"{r['acc']:.4f}", norm])
    out += _table(["task", "split", "examples", "acc", "acc_norm"], rows, right=2) + [""]

    out += [
        "## The compression engine at LLM shapes, on a GPU",
        "",
        f"Sources: {_link('compress_shapes/llama7b.json', p)}, {_link('compress_shapes/llama3_8b.json', p)}. "
        "Random weights of the model's shapes, model on CPU, one decoder layer at a time on one H100; "
        "calibration 128 x 2048.",
        "",
    ]
    rows = []
    for rel in ("compress_shapes/llama7b.json", "compress_shapes/llama3_8b.json"):
        for r in _load(rel)["rows"]:
            rows.append([r["shape"], r["method"], f"{r['wall_s_per_layer']:.1f}", f"{r['peak_device_mib'] / 1024:.1f}"])
    out += _table(["shape", "method", "seconds per layer", "peak GPU GiB"], rows, right=2) + [""]

    idp = _load("idp_prefill/latency.json")
    out += [
        "## IDP's prefill cost",
        "",
        f"Source: {_link('idp_prefill/latency.json', p)}. Prefill of {idp['args']['batch']} PTB-test inputs of "
        f"{idp['args']['seqlen']} tokens, median of {idp['args']['repeats']} rounds, against one 20-token soft "
        "prompt in the same round.",
        "",
    ]
    out += _table(
        ["case", "prefill ms", "vs the soft prompt"],
        [[r["name"], f"{r['prefill_ms']:.0f}", f"{100 * r['vs_soft_prompt']:+.1f}%"] for r in idp["rows"]],
    )
    out += [""]

    sweep = _load("scale/sweep.json")
    out += [
        "## Local executor against Ray",
        "",
        f"Source: {_link('scale/sweep.json', p)}. The shipped sweep recipe shrunk with "
        f"`{' '.join('--set ' + o for o in sweep['overrides'])}` on {sweep['machine']['cpus']} CPU cores.",
        "",
    ]
    out += _table(
        ["executor", "stages", "wall s", "metric rows identical"],
        [
            [r["executor"], str(r["stages"]), f"{r['wall_s']:.0f}", "yes" if r["metrics_identical"] else "no"]
            for r in sweep["rows"]
        ],
        right=1,
    )
    return "\n".join(out) + "\n"


def splice(readme: str, table: str) -> str:
    """The README with the text between the markers replaced by ``table``."""
    if START not in readme or END not in readme:
        raise SystemExit(f"README has no {START} ... {END} markers")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--results-page", type=Path, default=ROOT / "docs" / "results.md")
    ap.add_argument("--check", action="store_true", help="exit 1 if a page is stale instead of writing it")
    args = ap.parse_args(argv)
    pages = {args.results_page: results_page()}
    if args.readme.is_file() and START in args.readme.read_text(encoding="utf-8"):
        pages[args.readme] = splice(args.readme.read_text(encoding="utf-8"), readme_table())
    else:
        print(f"{args.readme}: no results markers, left alone")
    stale = [path for path, text in pages.items() if not path.is_file() or path.read_text(encoding="utf-8") != text]
    if args.check:
        for path in stale:
            print(f"{path} is stale: run python benchmarks/report.py")
        return 1 if stale else 0
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(pages[path], encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
