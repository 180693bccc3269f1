"""PNG plots of a run (matplotlib, Agg backend): per-task bars, gap closed, training curve, sweep curves."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from recoup.evaluate.metrics import lower_is_better

log = logging.getLogger(__name__)

ROLE_COLORS = {"dense": "#4c72b0", "compressed": "#c44e52", "recovered": "#55a868", "transfer": "#8172b2"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    return path


def task_bars(view, out: Path) -> Path | None:
    """One panel per task: the headline metric of every evaluated model, coloured by role."""
    if not view.evals or not view.tasks:
        return None
    plt = _plt()
    n = len(view.tasks)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.2 * cols, 3.2 * rows + 0.6 * max(0, len(view.evals) - 4) / 2), squeeze=False
    )
    for ax, task in zip(axes.flat, view.tasks):
        evs = [e for e in view.evals if task in e.values]
        vals = [e.values[task]["value"] for e in evs]
        errs = [e.values[task].get("stderr") or 0.0 for e in evs]
        ax.bar(range(len(evs)), vals, yerr=errs, color=[ROLE_COLORS.get(e.role, "gray") for e in evs], capsize=2)
        ax.set_xticks(range(len(evs)), [e.title for e in evs], rotation=35, ha="right", fontsize=7)
        metric = evs[0].values[task]["metric"] if evs else "?"
        ax.set_title(f"{task} ({metric}, {'lower' if lower_is_better(metric) else 'higher'} is better)", fontsize=9)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
        if view.dense and task in view.dense.values:
            ax.axhline(view.dense.values[task]["value"], color=ROLE_COLORS["dense"], lw=0.8, ls="--")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ROLE_COLORS.values()]
    fig.legend(handles, list(ROLE_COLORS), loc="upper center", ncol=4, fontsize=8, bbox_to_anchor=(0.5, 1.04))
    fig.tight_layout()
    path = _save(fig, out / "tasks.png")
    plt.close(fig)
    return path


def gap_bars(view, out: Path) -> Path | None:
    """Gap closed (%) per task for each recovered / transferred evaluation."""
    from recoup.runs.report import _gap, recovery_pairs

    pairs = recovery_pairs(view)
    if not pairs or view.dense is None:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.5, 1.3 * len(view.tasks) * len(pairs)), 3.4))
    width = 0.8 / len(pairs)
    for j, (before, after) in enumerate(pairs):
        vals = [(_gap(view, t, before, after) or 0.0) * 100 for t in view.tasks]
        xs = [i + (j - (len(pairs) - 1) / 2) * width for i in range(len(view.tasks))]
        ax.bar(
            xs,
            vals,
            width,
            color=ROLE_COLORS.get(after.role, "gray"),
            alpha=0.6 + 0.4 * (j % 2),
            label=f"{after.title} ({after.role})",
        )
        for x, v in zip(xs, vals):
            ax.text(x, v, f"{v:.0f}%", ha="center", va="bottom" if v >= 0 else "top", fontsize=7)
    ax.axhline(0, color="black", lw=0.6)
    ax.axhline(100, color=ROLE_COLORS["dense"], lw=0.8, ls="--")
    ax.set_xticks(range(len(view.tasks)), view.tasks, fontsize=8)
    ax.set_ylabel("gap to dense closed (%)")
    ax.set_title("what the recovery won back", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = _save(fig, out / "gap_closed.png")
    plt.close(fig)
    return path


def training_curve(view, out: Path) -> Path | None:
    """Training loss per step and validation loss at each check, per recovery."""
    stages = [s for s in view.stages if s["kind"] == "recover" and s["status"] == "done" and s["result"]]
    if not stages:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for s in stages:
        tr = s["result"].get("train") or {}
        loss = tr.get("train_loss") or []
        if loss:
            ax.plot(range(1, len(loss) + 1), loss, lw=0.8, alpha=0.7, label=f"{s['labels'].get('recovery')} train")
        val = tr.get("val_loss") or []
        if val:
            ax.plot([v[0] for v in val], [v[1] for v in val], "o-", ms=3, label=f"{s['labels'].get('recovery')} valid")
        base = s["result"].get("val_loss_without_recovery")
        if isinstance(base, float):
            ax.axhline(base, color="gray", ls="--", lw=0.8, label="valid, no recovery")
    ax.set_xlabel("step")
    ax.set_ylabel("next-token loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = _save(fig, out / "training.png")
    plt.close(fig)
    return path


def sweep_curves(view, out: Path) -> Path | None:
    """LLM-KICK-style: headline metric vs sparsity, one line per method (and bits), dense and its matching band."""
    comp = [e for e in view.evals if e.role == "compressed" and isinstance(e.labels.get("sparsity"), (int, float))]
    per_line: dict[tuple, set] = defaultdict(set)
    for e in comp:
        per_line[(e.labels.get("method"), e.labels.get("bits"))].add(float(e.labels["sparsity"]))
    if not any(len(levels) >= 2 for levels in per_line.values()):
        return None  # no method evaluated at two sparsity levels: no curve to draw
    plt = _plt()
    n = len(view.tasks)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 3.6), squeeze=False)
    for ax, task in zip(axes.flat, view.tasks):
        lines: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
        for e in comp:
            if task in e.values:
                key = e.labels.get("method") + (f" {e.labels['bits']}-bit" if e.labels.get("bits") else "")
                row = e.values[task]
                lines[key].append((float(e.labels["sparsity"]), row["value"], row.get("stderr") or 0.0))
        for key, pts in lines.items():
            pts.sort()
            ax.errorbar(
                [p[0] * 100 for p in pts],
                [p[1] for p in pts],
                yerr=[p[2] for p in pts],
                marker="o",
                ms=4,
                capsize=2,
                label=key,
            )
        metric = next((e.values[task]["metric"] for e in comp if task in e.values), "?")
        if view.dense and task in view.dense.values:
            d = view.dense.values[task]["value"]
            lo, hi = (d, d * (1 + view.matching)) if lower_is_better(metric) else (d * (1 - view.matching), d)
            ax.axhline(d, color="black", lw=0.9, ls="--", label="dense")
            ax.axhspan(lo, hi, color="green", alpha=0.15, label=f"matching (±{view.matching:.0%})")
        if lower_is_better(metric):
            ax.set_yscale("log")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel(metric)
        ax.set_title(task, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = _save(fig, out / "sweep.png")
    plt.close(fig)
    return path


def write_plots(view, out: Path) -> list[Path]:
    """Every plot that applies to this run; returns the written paths."""
    paths = []
    for fn in (task_bars, gap_bars, training_curve, sweep_curves):
        p = fn(view, out)
        if p is not None:
            paths.append(p)
    return paths
