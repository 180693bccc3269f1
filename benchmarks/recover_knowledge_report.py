"""Analysis and output of the knowledge-recovery study (``benchmarks/recover_knowledge.py``).

- :func:`paired_bootstrap`: the 95% interval of a row's accuracy delta against the compressed row, resampling
  the *same* examples for both (paired), ``B`` seeded resamples, percentile interval;
- :func:`gap_closed`: the share of the compressed -> dense gap a row wins back (1 = dense, 0 = compressed; none
  where compressed is within 1% of dense or better);
- matching dense: :func:`recoup.evaluate.metrics.matching` (LLM-KICK's within-5% rule, the project's one
  definition), per column;
- :func:`markdown` (one table per artifact) and :func:`plot` (matplotlib, grouped bars by artifact).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger("recover_knowledge")

# (row key, table label, lower is better); accuracy columns have per-example lists under row["per_example"][task]
PPL_COLUMNS = [("ppl_ptb", "PTB ppl"), ("ppl_wiki", "wiki ppl")]
TASKS = [("arc_easy", "ARC-E"), ("piqa", "PIQA"), ("sciq", "SciQ held-out"), ("mmlu", "MMLU")]


def paired_bootstrap(row: list[float], base: list[float], resamples: int = 2000, seed: int = 0) -> dict:
    """Mean delta ``row - base`` over paired per-example scores (n,) and its percentile 95% interval."""
    if len(row) != len(base) or not row:
        raise ValueError(f"paired bootstrap needs two equal non-empty lists (got {len(row)} and {len(base)})")
    diff = torch.tensor(row, dtype=torch.float64) - torch.tensor(base, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    means = diff[torch.randint(len(diff), (resamples, len(diff)), generator=g)].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"delta": float(diff.mean()), "ci95": [lo, hi], "resamples": resamples, "n": len(diff)}


def gap_closed(value: float, comp: float, dense: float, lower_better: bool) -> float | None:
    """The project's one definition (:func:`recoup.runs.metrics.gap_closed`): None where the compressed row lost
    nothing to win back (better than dense, or within 1% of it: a share of that is noise, e.g. +500%)."""
    from recoup.runs.metrics import gap_closed as share

    return share(dense, comp, value, "ppl" if lower_better else "acc")


def analyse(rows: dict[str, dict], resamples: int, seed: int) -> dict[str, dict]:
    """Per row and column: delta vs compressed (bootstrap CI for accuracies), gap closed, matches dense (5%)."""
    from recoup.evaluate.metrics import matching

    dense, comp = rows.get("dense"), rows.get("compressed")
    out: dict[str, dict] = {}
    for name, r in rows.items():
        cols: dict[str, dict] = {}
        for key, _ in PPL_COLUMNS:
            c: dict = {}
            if comp:
                c["delta"] = r[key] - comp[key]
            if dense and comp:
                c["gap_closed"] = gap_closed(r[key], comp[key], dense[key], True)
            if dense:
                c["matches_dense"] = matching(dense[key], r[key], metric="ppl")
            cols[key] = c
        for task, _ in TASKS:
            if task not in r["per_example"]:
                continue
            c = {}
            if comp and r["examples_digest"][task] != comp["examples_digest"][task]:
                raise ValueError(f"{name} and compressed scored different {task} examples; measure them alike")
            if comp and task in comp["per_example"]:
                c.update(paired_bootstrap(r["per_example"][task], comp["per_example"][task], resamples, seed))
            if dense and comp and task in dense["per_example"] and task in comp["per_example"]:
                c["gap_closed"] = gap_closed(r[task], comp[task], dense[task], False)
            if dense and task in dense["per_example"]:
                c["matches_dense"] = matching(dense[task], r[task], metric="acc")
            cols[task] = c
        out[name] = cols
    return out


def _pct(x: float | None) -> str:
    return "" if x is None else f"; {100 * x:+.0f}% gap"


def markdown(groups: dict[str, dict], setup: dict) -> str:
    """One table per artifact: extra parameters, fit seconds, perplexities, accuracies (delta vs compressed with
    its paired-bootstrap 95% interval, gap closed), latency, and the columns matching dense within 5%."""
    lines = [
        f"Knowledge recovery without task data (task rows are references). {setup['protocol']}",
        "",
        "Accuracy cells: acc (delta vs compressed [95% paired bootstrap]; share of the compressed -> dense gap "
        "closed). `=` marks a value within 5% of dense (LLM-KICK matching).",
        "",
    ]
    for label, group in groups.items():
        rows, ana = group["rows"], group["analysis"]
        lines += [
            f"### {label} (`{group['artifact']}`)",
            "",
            "| row | extra params (% base) | fit s | "
            + " | ".join(label for _, label in PPL_COLUMNS + TASKS)
            + " | prefill ms | decode ms/tok | matches dense |",
            "|---" * (6 + len(PPL_COLUMNS) + len(TASKS)) + "|",
        ]
        for name, r in rows.items():
            a, cells, matched = ana[name], [], []
            for key, lab in PPL_COLUMNS:
                c = a[key]
                cells.append(
                    f"{r[key]:.2f}{' =' if c.get('matches_dense') else ''}"
                    + (
                        f" ({100 * c['gap_closed']:+.0f}% gap)"
                        if c.get("gap_closed") is not None and name not in ("dense", "compressed")
                        else ""
                    )
                )
                matched += [lab] if c.get("matches_dense") else []
            for task, lab in TASKS:
                c = a.get(task)
                if c is None:
                    cells.append("-")
                    continue
                cell = f"{r[task]:.3f}{' =' if c.get('matches_dense') else ''}"
                if "delta" in c and name not in ("dense", "compressed"):
                    cell += (
                        f" ({c['delta']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]{_pct(c.get('gap_closed'))})"
                    )
                cells.append(cell)
                matched += [lab] if c.get("matches_dense") else []
            lines.append(
                f"| {name} | {r['parameters']:,} ({r['parameters_pct']:.2f}%) | {r['fit_seconds']:.0f} | "
                + " | ".join(cells)
                + f" | {r['prefill_ms']:.1f} | {r['decode_ms_per_token']:.2f} | "
                + (", ".join(matched) or "none")
                + " |"
            )
        skipped = group.get("skipped") or {}
        if skipped:
            lines += ["", *(f"Skipped `{n}`: {why}" for n, why in skipped.items())]
        lines += ["", *budget_lines(rows, ana), ""]
    return "\n".join(lines)


ZERO = "0 extra parameters at inference"  # a recovery inside the artifact (tune rows): a new artifact, same size
BUDGETS = [(0.1, "<= 0.1% (the seeds' claim: a prompt)"), (2.0, "<= 2%"), (10.0, "<= 10%"), (float("inf"), "any")]


def budget_lines(rows: dict[str, dict], ana: dict[str, dict]) -> list[str]:
    """Which recovery without task data does best within each extra-parameter budget, the first budget being no
    extra parameter at all (a tuned artifact): the highest mean accuracy delta against the compressed row over
    the accuracy columns (points: a share of a gap of one or two points is noise), with each column's delta and
    the share of the PTB gap closed."""
    free = {n: r for n, r in rows.items() if n not in ("dense", "compressed") and ":task=" not in n}
    tasks = [t for t, _ in TASKS if all("delta" in ana[n].get(t, {}) for n in free)]
    if not free or not tasks:
        return []
    score = {n: sum(ana[n][t]["delta"] for t in tasks) / len(tasks) for n in free}
    out = [
        f"Best without task data per extra-parameter budget (mean accuracy delta vs compressed over "
        f"{', '.join(lab for t, lab in TASKS if t in tasks)}):",
        "",
    ]
    for cap, label in [(0.0, ZERO), *BUDGETS]:
        within = [n for n in free if (free[n]["parameters"] == 0 if cap == 0.0 else free[n]["parameters_pct"] <= cap)]
        if not within:
            out.append(f"- {label}: no row")
            continue
        n = max(within, key=lambda k: score[k])
        each = ", ".join(f"{lab} {100 * ana[n][t]['delta']:+.1f}" for t, lab in TASKS if t in tasks)
        ptb = ana[n]["ppl_ptb"].get("gap_closed")
        out.append(
            f"- {label}: `{n}` ({free[n]['parameters_pct']:.2f}%): {100 * score[n]:+.1f} points ({each}); "
            f"PTB gap closed {'-' if ptb is None else f'{100 * ptb:+.0f}%'}"
        )
    return out


def plot(groups: dict[str, dict], path: Path) -> bool:
    """Grouped bars (one colour per artifact) of PTB ppl and every accuracy; False (logged) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        log.info("matplotlib is not installed: no plot written (pip install matplotlib)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [PPL_COLUMNS[0]] + TASKS
    names = list(dict.fromkeys(n for g in groups.values() for n in g["rows"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    width = 0.8 / max(1, len(groups))
    for ax, (key, label) in zip(axes, panels):
        for j, (glabel, g) in enumerate(groups.items()):
            xs = [i + j * width for i, n in enumerate(names) if n in g["rows"] and key in g["rows"][n]]
            ys = [g["rows"][n][key] for n in names if n in g["rows"] and key in g["rows"][n]]
            ax.bar(xs, ys, width, label=glabel)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=35, ha="right", fontsize=7)
        ax.set_title(label)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
