"""recoup compare-recovery: dense, compressed and each recovery on a task's held-out part."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from recoup.safeio import dumps


def register(sub) -> None:
    p = sub.add_parser(
        "compare-recovery",
        help="dense vs compressed vs recoveries: held-out task metrics, extra parameters, prefill/decode latency",
        description="Score every row on the held-out part of TASK's seeded hash split (the part "
        "tuning never sees), count the parameters each recovery adds, time prefill and "
        "per-token decode (batch 1), and check the base weights stay bit-identical.",
    )
    p.add_argument("--task", required=True, help="multiple-choice task of the suite, e.g. sciq or boolq")
    p.add_argument("--dense", help="dense model source (row 'dense')")
    p.add_argument(
        "--dense-recovery",
        action="append",
        default=[],
        metavar="[LABEL=]DIR",
        help="a saved recovery attached to --dense (row 'dense+METHOD' or 'dense+LABEL'; e.g. the CPET "
        "teacher's LoRA); repeatable",
    )
    p.add_argument("--compressed", help="compressed artifact (row 'compressed'; recoveries attach to it)")
    p.add_argument(
        "--recovery",
        action="append",
        default=[],
        metavar="[LABEL=]DIR",
        help="a saved recovery of any method attached to --compressed (row '+METHOD' or '+LABEL'); repeatable",
    )
    p.add_argument(
        "--skip-compressed-row",
        action="store_true",
        help="do not score the compressed artifact itself (e.g. its row is in --include already)",
    )
    p.add_argument("--heldout-fraction", type=float, default=0.3, help="held-out share of the task (default 0.3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the hash split (default 0; match the training run)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N held-out examples")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128, help="latency prompt length in tokens (default 128)")
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps timed (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats, median reported (default 3)")
    p.add_argument(
        "--include",
        default=None,
        metavar="JSON",
        help="put the rows of an earlier compare-recovery --json first (same task, split and limit)",
    )
    p.add_argument("--json", default=None, help="write rows + protocol here")
    p.set_defaults(func=run)


def _labelled(items: list[str], prefix: str) -> list[tuple[str, str]]:
    """``[LABEL=]DIR`` -> (row label, dir); without a label the row is named after the saved method."""
    from recoup.recover.methods import saved_method

    out = []
    for item in items:
        label, _, path = item.partition("=") if "=" in item.split("/")[0] else ("", "", item)
        out.append((f"{prefix}{label or saved_method(path)}", path))
    return out


def entries(args: argparse.Namespace) -> list:
    from recoup.errors import RecoupError
    from recoup.runs.compare_recovery import Entry

    rows = []
    dense = _labelled(args.dense_recovery, "dense+")
    attached = _labelled(args.recovery, "+")
    labels = [label for label, _ in dense + attached]
    if len(set(labels)) != len(labels):
        raise RecoupError(
            f"two rows are labelled '{next(x for x in labels if labels.count(x) > 1)}'; name them with LABEL=DIR"
        )
    if args.dense:
        rows.append(Entry("dense", args.dense))
        rows += [Entry(label, args.dense, path) for label, path in dense]
    elif dense:
        raise RecoupError("--dense-recovery needs --dense")
    if args.skip_compressed_row and not args.compressed:
        raise RecoupError("--skip-compressed-row needs --compressed (the recoveries attach to it)")
    if args.compressed:
        if not args.skip_compressed_row:
            rows.append(Entry("compressed", args.compressed))
        rows += [Entry(label, args.compressed, path) for label, path in attached]
    elif attached:
        raise RecoupError("recoveries attach to --compressed; give the compressed artifact")
    if not rows:
        raise RecoupError("nothing to compare: give --dense and/or --compressed (with recoveries)")
    return rows


def run(args: argparse.Namespace) -> int:
    from recoup.errors import RecoupError
    from recoup.evaluate.latency import LatencyConfig
    from recoup.runs.compare_recovery import compare, format_table, merge

    if args.limit is not None and args.limit < 1:
        raise RecoupError(f"--limit must be positive (got {args.limit})")
    latency = LatencyConfig(args.prompt_len, args.new_tokens, args.repeats)
    earlier = None
    if args.include:
        try:
            earlier = json.loads(Path(args.include).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RecoupError(f"--include {args.include}: not a compare-recovery JSON ({type(exc).__name__})") from None
    result = compare(entries(args), args.task, args.heldout_fraction, args.seed, args.batch_size, latency, args.limit)
    if earlier is not None:
        result = merge(earlier, result)
    print(format_table(result))
    p = result["protocol"]
    print(
        f"\ntask {p['task']}: held-out {p['n_heldout']} of {p['n_heldout'] + p['n_train']} (fraction "
        f"{p['heldout_fraction']}, seed {p['seed']}); latency batch 1, prompt {p['latency']['prompt_len']} tokens, "
        f"{p['latency']['new_tokens']} decode steps, median of {p['latency']['repeats']}"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(dumps(result, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0
