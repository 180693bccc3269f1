"""Dense, compressed and every recovery side by side on a task's held-out part.

For each entry (a model source and optionally a saved recovery) :func:`compare` measures

- the task metrics (acc, acc_norm with stderr) on the *held-out* part of the task's seeded hash
  split (:func:`recoup.recover.task_data.split_task`), scored by the evaluation Scorer with the
  recovery attached (:func:`recoup.evaluate.heldout.score_examples`), so no example used for tuning is
  ever scored;
- the extra parameters the recovery adds (``Recovery.num_parameters``) and their share of the base;
- latency, batch 1 (:func:`recoup.evaluate.latency.measure_latency`): prefill of a ``prompt_len``-token
  prompt cut from the held-out contexts (the recovery's prefix computation, e.g. IDP's prompt selection,
  included) and per-token greedy decode with the KV cache over ``new_tokens`` steps; the median of
  ``repeats`` runs after one warm-up;
- whether the base weights are bit-identical after attaching the recovery and scoring
  (sha256 of every targeted linear, see :func:`recoup.recover.base.linear_digests`) and, for
  adapters, whether training recorded them intact.

A recovery tuned on the compared task (a LoRA, CPET, soft prompt or IDP pool trained with ``--task``
records its split protocol in ``meta["data"]``) must have used the same split (heldout_fraction, seed,
example counts), else it may have trained on examples this comparison scores: one clear error
(:func:`check_tuning_split`). Recoveries tuned on a corpus or another task are scored as they are.

These are the axes of the IDP paper's "21x fewer parameters, 60% lower latency" claim.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
from torch import nn

from recoup.errors import RecoupError
from recoup.evaluate.latency import LatencyConfig, measure_latency, prompt_ids

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Entry:
    """One row: a label, a model source and an optional saved recovery directory."""

    label: str
    source: str
    recovery: str | None = None


def base_sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros over every targeted linear's frozen weight."""
    from recoup.model.anatomy import anatomy
    from recoup.recover.base import base_of, weight_of

    zeros = total = 0
    for _, mod in anatomy(base_of(model)).iter_linears():
        w = weight_of(mod)
        zeros += w.numel() - int(torch.count_nonzero(w))
        total += w.numel()
    return zeros / total


def check_tuning_split(label: str, desc: dict, split) -> str | None:
    """What the recovery was tuned on (task or corpus name, None if unrecorded); RecoupError when it was
    tuned on ``split.task`` with another split than ``split`` (its training examples could be scored)."""
    proto = desc.get("data")
    if not isinstance(proto, dict):
        return None
    if proto.get("task") != split.task:
        return proto.get("task") or proto.get("corpus") or proto.get("data")
    here = {
        "heldout_fraction": split.heldout_fraction,
        "seed": split.seed,
        "n_train": len(split.train),
        "n_heldout": len(split.heldout),
    }
    diff = [f"{k} {proto.get(k)!r} (here {v!r})" for k, v in here.items() if proto.get(k) != v]
    if diff:
        raise RecoupError(
            f"{label}: the recovery was tuned on another split of {split.task}: {', '.join(diff)}; "
            f"it may have trained on scored examples (match --heldout-fraction/--seed to its training)"
        )
    return split.task


def evaluate_entry(
    entry: Entry,
    split,
    batch_size: int = 8,
    latency: LatencyConfig = LatencyConfig(),
    limit: int | None = None,
    dtype: str = "float32",
) -> dict:
    """Score, count and time one entry (see module docstring); the model is loaded fresh for it."""
    from recoup.artifact import load_model
    from recoup.evaluate.heldout import score_examples
    from recoup.recover.base import compression_digest, linear_digests
    from recoup.recover.methods import load_recovery

    loaded = load_model(entry.source, dtype=dtype)
    base_params = sum(p.numel() for p in loaded.model.parameters())
    before = linear_digests(loaded.model)
    sparsity = base_sparsity(loaded.model)
    fingerprint = compression_digest(loaded.model, loaded.manifest)
    recovery = load_recovery(entry.recovery) if entry.recovery else None
    tuned_on = check_tuning_split(entry.label, recovery.describe(), split) if recovery is not None else None
    model = recovery.apply(loaded.model) if recovery is not None else loaded.model
    examples = split.heldout if limit is None else split.heldout[:limit]
    t0 = time.time()
    metrics = score_examples(model, loaded.tokenizer, [ex.as_suite() for ex in examples], recovery, batch_size)
    score_s = time.time() - t0
    prompt = prompt_ids(loaded.tokenizer, [ex.gold_pair[0] for ex in split.heldout], latency.prompt_len)
    lat = measure_latency(model, prompt, recovery, latency)
    intact = linear_digests(model) == before
    after = compression_digest(model, loaded.manifest)
    if fingerprint is not None:
        intact = intact and after["digest"] == fingerprint["digest"]
    if not intact:
        raise RecoupError(f"{entry.label}: the base weights changed after attaching {entry.recovery}")
    extra = recovery.num_parameters() if recovery is not None else 0
    desc = recovery.describe() if recovery is not None else {"method": "none"}
    lat.pop("generated")
    row = {
        "label": entry.label,
        "source": entry.source,
        "recovery": entry.recovery,
        "method": desc.get("method", "none"),
        **metrics,
        "extra_parameters": extra,
        "extra_parameters_pct": 100.0 * extra / base_params,
        "base_parameters": base_params,
        **lat,
        "base_sparsity": sparsity,
        "base_intact_after_apply": intact,
        "base_intact_after_training": desc.get("base_intact"),
        "merged": desc.get("merged"),
        "tuned_on": tuned_on,
        "score_seconds": round(score_s, 1),
    }
    if fingerprint is not None:
        row.update(
            {
                "compression_digest": fingerprint["digest"],
                "compression_digest_after": after["digest"],
                "on_grid_after": after["all_on_grid"],
            }
        )
    if desc.get("method") == "idp":
        row["idp_selected"] = desc.get("selected")
    log.info(
        "%s: acc=%.4f acc_norm=%.4f extra=%d prefill=%.1fms decode=%.2fms/token",
        entry.label,
        row["acc"],
        row["acc_norm"],
        extra,
        row["prefill_ms"],
        row["decode_ms_per_token"],
    )
    return row


def compare(
    entries: list[Entry],
    task: str,
    heldout_fraction: float = 0.3,
    seed: int = 0,
    batch_size: int = 8,
    latency: LatencyConfig = LatencyConfig(),
    limit: int | None = None,
    dtype: str = "float32",
) -> dict:
    """Every entry on the held-out part of ``task``; returns ``{"rows": [...], "protocol": {...}}``."""
    from recoup.recover.methods import load_recovery
    from recoup.recover.task_data import split_task

    if not entries:
        raise RecoupError("nothing to compare: give at least one model")
    if batch_size < 1:
        raise RecoupError(f"batch_size must be >= 1 (got {batch_size})")
    if not 0 < heldout_fraction < 1:
        raise RecoupError(f"heldout_fraction must be in (0, 1) (got {heldout_fraction})")
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise RecoupError(f"duplicate row labels: {labels}")
    from recoup.recipe.jobs import check_source
    from recoup.recover.methods import saved_method

    for e in entries:  # every source and recovery directory, before the first model loads
        check_source(e.source)
        if e.recovery:
            saved_method(e.recovery)
    split = split_task(task, heldout_fraction, seed)
    for e in entries:  # before any row is scored: a recovery tuned on another split of the task fails at once
        if e.recovery:
            check_tuning_split(e.label, load_recovery(e.recovery).describe(), split)
    rows = [evaluate_entry(e, split, batch_size, latency, limit, dtype) for e in entries]
    protocol = {
        **split.protocol,
        "scored": "held-out part" + (f", first {limit}" if limit else ""),
        "latency": dataclasses.asdict(latency),
        "dtype": dtype,
        "torch": torch.__version__,
        "metric": "acc, acc_norm (lm-evaluation-harness definitions) via the Scorer",
    }
    return {"rows": rows, "protocol": protocol}


_SAME = ("task", "heldout_fraction", "seed", "n_heldout", "scored")


def merge(earlier: dict, later: dict) -> dict:
    """Rows of an earlier :func:`compare` result followed by a later one's, when both scored the same
    held-out examples (same task, fraction, seed, count, limit); a different protocol is one clear line."""
    for key in _SAME:
        if earlier["protocol"].get(key) != later["protocol"].get(key):
            raise RecoupError(
                f"cannot include rows measured with another protocol: {key} is "
                f"{earlier['protocol'].get(key)!r} there and {later['protocol'].get(key)!r} here"
            )
    labels = [r["label"] for r in earlier["rows"]] + [r["label"] for r in later["rows"]]
    if len(set(labels)) != len(labels):
        raise RecoupError(f"duplicate row labels after including earlier rows: {labels}")
    return {
        "rows": earlier["rows"] + later["rows"],
        "protocol": {**later["protocol"], "included_from_earlier_run": len(earlier["rows"])},
    }


COLUMNS = (
    ("label", "{}"),
    ("acc", "{:.4f}"),
    ("acc_stderr", "{:.4f}"),
    ("acc_norm", "{:.4f}"),
    ("n", "{}"),
    ("extra_parameters", "{:,}"),
    ("extra_parameters_pct", "{:.3f}%"),
    ("prefill_ms", "{:.1f}"),
    ("decode_ms_per_token", "{:.2f}"),
    ("base_sparsity", "{:.3f}"),
    ("base_intact_after_apply", "{}"),
)


def format_table(result: dict) -> str:
    """A Markdown table of :func:`compare`'s rows."""
    head = "| " + " | ".join(c for c, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * len(COLUMNS)]
    for row in result["rows"]:
        lines.append(
            "| " + " | ".join(fmt.format(row[c]) if row.get(c) is not None else "-" for c, fmt in COLUMNS) + " |"
        )
    return "\n".join(lines)
