"""A run's report, built only from the results store: Markdown tables, PNG plots, a summary paragraph.

Tables: every evaluated model per task (matching marks, LLM-KICK: within 5% of dense), the
recovery (dense vs compressed vs recovered, gap closed) and its transfers, training, compression,
stage timings and the full protocol. Plots (matplotlib, Agg): per-task bars, gap closed, the
training curve, and for sweeps the metric-vs-sparsity curve per method with the matching band.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

from recoup.evaluate.metrics import lower_is_better, matching
from recoup.runs.metrics import gap_closed
from recoup.runs.store import Store
from recoup.safeio import dumps

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalRow:
    stage: str
    labels: dict
    values: dict[str, dict]  # task -> primary metric row (metric, value, n, stderr)

    @property
    def role(self) -> str:
        return self.labels.get("role", "?")

    @property
    def title(self) -> str:
        comp = self.labels.get("compression", "?")
        rec = self.labels.get("recovery")
        return f"{comp} + {rec}" if rec and self.role in ("recovered", "transfer") else comp


@dataclasses.dataclass
class RunView:
    """What a report needs from the store for one run."""

    run: dict
    stages: list[dict]
    evals: list[EvalRow]
    tasks: list[str]
    matching: float

    @property
    def dense(self) -> EvalRow | None:
        return next((e for e in self.evals if e.role == "dense"), None)

    def find(self, role: str, compression: str, recovery: str | None = None) -> EvalRow | None:
        return next(
            (
                e
                for e in self.evals
                if e.role == role
                and e.labels.get("compression") == compression
                and (recovery is None or e.labels.get("recovery") == recovery)
            ),
            None,
        )


def load_view(store: Store, run_id: str) -> RunView:
    run = store.run(run_id)
    stages = store.stages(run["run_id"])
    rows = store.metrics(run["run_id"])
    recipe = json.loads(run["recipe"])
    evals, tasks = [], []
    for st in stages:
        if st["kind"] != "evaluate" or st["status"] != "done":
            continue
        values = {r["task"]: r for r in rows if r["stage"] == st["stage"] and r["protocol"].get("primary")}
        evals.append(EvalRow(st["stage"], st["labels"], values))
        tasks += [t for t in values if t not in tasks]
    order = list((recipe.get("evaluate") or {}).get("tasks") or [])
    primary = {r["task"]: r["metric"] for r in rows if r["protocol"].get("primary")}
    # recipe order, then lower-is-better (perplexity) tasks first, then by name
    tasks.sort(key=lambda t: (order.index(t) if t in order else len(order), not lower_is_better(primary.get(t, "")), t))
    matching = float((recipe.get("report") or {}).get("matching", 0.05))
    return RunView(run, stages, evals, tasks, matching)


def fmt(row: dict | None, with_err: bool = True) -> str:
    if row is None:
        return "–"
    v, m = row["value"], row["metric"]
    text = f"{v:.2f}" if lower_is_better(m) or abs(v) >= 10 else f"{v:.3f}"
    if with_err and row.get("stderr") is not None:
        text += f" ± {row['stderr']:.3f}" if abs(row["stderr"]) < 1 else f" ± {row['stderr']:.2f}"
    return text


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{round(x * 100)}%"  # int rounding: no "-0%"


def _mark(view: RunView, e: EvalRow, task: str) -> str:
    dense = view.dense.values.get(task) if view.dense else None
    row = e.values.get(task)
    if dense is None or row is None or e.role == "dense":
        return ""
    return " ✓" if matching(dense["value"], row["value"], view.matching, metric=row["metric"]) else " ✗"


def _gap(view: RunView, task: str, before: EvalRow | None, after: EvalRow | None) -> float | None:
    d = view.dense.values.get(task) if view.dense else None
    b = before.values.get(task) if before else None
    a = after.values.get(task) if after else None
    if d is None or b is None or a is None:
        return None
    return gap_closed(d["value"], b["value"], a["value"], d["metric"])


def recovery_pairs(view: RunView) -> list[tuple[EvalRow, EvalRow]]:
    """(compressed, compressed + recovery) pairs: each recovered and transfer evaluation with its baseline."""
    pairs = []
    for e in view.evals:
        if e.role in ("recovered", "transfer"):
            comp = e.labels.get("compression")
            before = view.dense if comp == "dense" else view.find("compressed", comp)
            if before is not None:
                pairs.append((before, e))
    return pairs


# ----------------------------------------------------------------------------- Markdown


def results_table(view: RunView) -> list[str]:
    head = (
        "| model | role | "
        + " | ".join(f"{t} ({_metric_of(view, t)}{'↓' if _lower(view, t) else '↑'})" for t in view.tasks)
        + " |"
    )
    lines = [head, "|" + "---|" * (2 + len(view.tasks))]
    for e in view.evals:
        cells = [fmt(e.values.get(t)) + _mark(view, e, t) for t in view.tasks]
        lines.append(f"| {e.title} | {e.role} | " + " | ".join(cells) + " |")
    return lines


def _metric_of(view: RunView, task: str) -> str:
    return next((e.values[task]["metric"] for e in view.evals if task in e.values), "?")


def _lower(view: RunView, task: str) -> bool:
    return lower_is_better(_metric_of(view, task))


def recovery_table(view: RunView) -> list[str]:
    pairs = recovery_pairs(view)
    if not pairs or view.dense is None:
        return []
    lines = [
        "| recovery | attached to | task | dense | compressed | + recovery | gap closed | matching |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for before, after in pairs:
        for t in view.tasks:
            where = after.labels.get("compression")
            kind = "trained here" if after.role == "recovered" else f"transfer from {after.labels.get('trained_on')}"
            lines.append(
                f"| {after.labels.get('recovery')} | {where} ({kind}) | {t} | {fmt(view.dense.values.get(t))} | "
                f"{fmt(before.values.get(t))}{_mark(view, before, t)} | "
                f"{fmt(after.values.get(t))}{_mark(view, after, t)} | {_pct(_gap(view, t, before, after))} | "
                f"{'yes' if _mark(view, after, t) == ' ✓' else 'no'} |"
            )
    return lines


def _stage_result(view: RunView, kind: str) -> list[dict]:
    return [s for s in view.stages if s["kind"] == kind and s["status"] == "done" and s["result"]]


def training_table(view: RunView) -> list[str]:
    rows = _stage_result(view, "recover")
    if not rows:
        return []
    lines = [
        "| recovery | method | trained on | steps | seconds | tokens | val loss before → best (step) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in rows:
        r, tr = s["result"], s["result"].get("train") or {}
        before = r.get("val_loss_without_recovery")
        best = tr.get("best_val_loss")
        loss = (
            f"{before:.4f} → {best:.4f} ({tr.get('best_step')})"
            if isinstance(before, float) and isinstance(best, float)
            else "–"
        )
        lines.append(
            f"| {s['labels'].get('recovery')} | {r.get('method')} | {s['labels'].get('compression')} | "
            f"{tr.get('steps')} | {tr.get('seconds', 0):.0f} | {tr.get('tokens')} | {loss} |"
        )
    return lines


def compression_table(view: RunView) -> list[str]:
    rows = _stage_result(view, "compress")
    if not rows:
        return []
    lines = ["| step | method | sparsity | bits | group | seconds | calibration |", "|---|---|---|---|---|---|---|"]
    for s in rows:
        cfg = (s["result"].get("report") or {}).get("config") or {}
        cal = s["result"].get("calibration") or {}
        lab = s["labels"]
        lines.append(
            f"| {lab.get('compression')} | {lab.get('method')} | {lab.get('pattern') or lab.get('sparsity')} | "
            f"{lab.get('bits') or '–'} | {cfg.get('group_size') or '–'} | "
            f"{s['result'].get('compress_seconds', 0):.0f} | "
            f"{cal.get('corpus')} {cal.get('split')} {cal.get('nsamples')}×{cal.get('seqlen')} seed {cal.get('seed')} |"
        )
    return lines


def stages_table(view: RunView) -> list[str]:
    lines = ["| stage | status | seconds | attempts | reused |", "|---|---|---|---|---|"]
    for s in view.stages:
        secs = f"{s['seconds']:.1f}" if s["seconds"] is not None else "–"
        lines.append(f"| {s['stage']} | {s['status']} | {secs} | {s['attempts']} | {s['cache_hits']} |")
    return lines


def summary_paragraph(view: RunView) -> str:
    """One paragraph: what compression cost and what recovery won back, per task (from the store only)."""
    if view.dense is None or not view.evals:
        return f"Run {view.run['run_id']}: {len(view.evals)} evaluations recorded (no dense reference to compare)."
    parts = []
    recipe = json.loads(view.run["recipe"])
    pairs = recovery_pairs(view)
    lost_seen = set()
    for before, after in pairs:
        comp = before.labels.get("compression")
        if comp not in lost_seen and before.role == "compressed":
            lost_seen.add(comp)
            deltas = []
            for t in view.tasks:
                d, c = view.dense.values.get(t), before.values.get(t)
                if d and c:
                    deltas.append(
                        f"{t} {fmt(d, False)} → {fmt(c, False)} ({(c['value'] / d['value'] - 1) * 100:+.1f}%)"
                    )
            parts.append(
                f"Compressing {recipe.get('model')} with {comp} ({_describe(before.labels)}) cost: "
                + "; ".join(deltas)
                + "."
            )
        wins = [
            f"{t} {fmt(before.values.get(t), False)} → {fmt(after.values.get(t), False)} "
            + (
                f"({_pct(g)} of the gap closed)"
                if (g := _gap(view, t, before, after)) is not None
                else "(no loss to win back there)"
            )
            for t in view.tasks
            if before.values.get(t) and after.values.get(t)
        ]
        what = (
            f"The {after.labels.get('recovery')} recovery learned on {comp}"
            if after.role == "recovered"
            else f"The same {after.labels.get('recovery')} attached unchanged to {comp} (transfer)"
        )
        parts.append(f"{what} won back: " + "; ".join(wins) + ".")
    if not pairs:
        comps = [e for e in view.evals if e.role == "compressed"]
        n_match = sum(1 for e in comps for t in view.tasks if _mark(view, e, t) == " ✓")
        total = sum(1 for e in comps for t in view.tasks if e.values.get(t))
        parts.append(
            f"{len(comps)} compressed models evaluated on {len(view.tasks)} task(s); {n_match} of {total} "
            f"(model, task) results match dense within {view.matching:.0%}."
        )
        parts += _sweep_sentences(view)
    else:
        rec = [e for _, e in pairs]
        n_match = sum(1 for e in rec for t in view.tasks if _mark(view, e, t) == " ✓")
        total = sum(1 for e in rec for t in view.tasks if e.values.get(t))
        parts += _best_sentences(view, pairs)
        parts.append(
            f"With recovery, {n_match} of {total} (model, task) results match dense within "
            f"{view.matching:.0%} (LLM-KICK's definition)."
        )
    return " ".join(parts)


def _best_sentences(view: RunView, pairs: list[tuple[EvalRow, EvalRow]]) -> list[str]:
    """Where two or more recoveries were learned on one compressed model: which won back most, per task."""
    out = []
    for comp in dict.fromkeys(b.labels.get("compression") for b, a in pairs if a.role == "recovered"):
        mine = [(b, a) for b, a in pairs if a.role == "recovered" and b.labels.get("compression") == comp]
        if len(mine) < 2:
            continue
        best = []
        for t in view.tasks:
            gaps = [(g, a.labels.get("recovery")) for b, a in mine if (g := _gap(view, t, b, a)) is not None]
            if gaps:
                g, name = max(gaps, key=lambda x: x[0])
                best.append(f"{t} by {name} ({_pct(g)})" if g > 0 else f"{t} by none (best {name}, {_pct(g)})")
        if best:
            out.append(f"Most of the gap closed on {comp}, per task: " + "; ".join(best) + ".")
    return out


def _describe(labels: dict) -> str:
    bits = f" + {labels['bits']}-bit" if labels.get("bits") else ""
    sp = labels.get("pattern") or (
        f"{labels['sparsity']:.0%}" if isinstance(labels.get("sparsity"), (int, float)) else ""
    )
    return f"{labels.get('method')} {sp}{bits}".strip()


def _sweep_sentences(view: RunView) -> list[str]:
    out = []
    for task in view.tasks[:1]:
        best: dict[str, float] = {}
        for e in view.evals:
            if (
                e.role == "compressed"
                and isinstance(e.labels.get("sparsity"), (int, float))
                and _mark(view, e, task) == " ✓"
            ):
                key = e.labels.get("method")
                best[key] = max(best.get(key, -1.0), float(e.labels["sparsity"]))
        methods = list(dict.fromkeys(e.labels.get("method") for e in view.evals if e.role == "compressed"))
        out.append(
            f"Highest sparsity still matching dense on {task}: "
            + ", ".join(f"{m} {best[m]:.0%}" if m in best else f"{m} none" for m in methods)
            + "."
        )
    return out


def write_report(store: Store, run_id: str, out_dir: str | Path) -> tuple[Path, str]:
    """Write ``report.md`` and the PNG plots into ``out_dir``; returns (report path, summary paragraph)."""
    from recoup.runs.plots import write_plots

    view = load_view(store, run_id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recipe = json.loads(view.run["recipe"])
    summary = summary_paragraph(view)
    plots = write_plots(view, out) if (recipe.get("report") or {}).get("plots", True) else []
    ev = recipe.get("evaluate") or {}
    md = [
        f"# recoup run `{view.run['run_id']}`",
        "",
        f"Recipe: `{view.run['recipe_source']}` (name `{recipe.get('name')}`), "
        f"model `{recipe.get('model')}`, dtype {recipe.get('dtype')}, seed {recipe.get('seed')}. "
        f"Store: `{store.path}`. Run directory: `{view.run['run_dir']}`.",
        "",
        "## Summary",
        "",
        summary,
        "",
        "## Results per task",
        "",
        f"Headline metric per task (↓ lower is better, ↑ higher); ± is the standard error; ✓ = matching dense "
        f"(within {view.matching:.0%}, LLM-KICK), ✗ = not. Evaluation: tasks {', '.join(view.tasks)}; "
        f"limit {ev.get('limit')} (perplexity windows / examples per task)"
        + "".join(f", {t}: {n}" for t, n in (ev.get("limits") or {}).items())
        + f"; perplexity window {ev.get('seqlen')} "
        f"tokens, batch {ev.get('batch_size')}.",
        "",
        *results_table(view),
        "",
    ]
    for title, table in (
        ("Recovery: dense vs compressed vs recovered", recovery_table(view)),
        ("Training", training_table(view)),
        ("Compression", compression_table(view)),
    ):
        if table:
            md += [f"## {title}", "", *table, ""]
    if plots:
        md += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    md += [
        "## Stages",
        "",
        "attempts = times the stage was started; reused = times a finished result was reused instead of recomputed.",
        "",
        *stages_table(view),
        "",
        "## Protocol (the recipe as run)",
        "",
        "```json",
        dumps(recipe, indent=1),
        "```",
        "",
    ]
    path = out / "report.md"
    tmp = out / f".report.md.{os.getpid()}.tmp"
    tmp.write_text("\n".join(md))
    os.replace(tmp, path)
    log.info("report: %s (%d plots)", path, len(plots))
    return path, summary
