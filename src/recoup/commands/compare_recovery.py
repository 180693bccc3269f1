"""recoup compare-recovery: dense, compressed and each recovery on a task's held-out part."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("compare-recovery", help="dense vs compressed vs recoveries: held-out task metrics, "
                                                "extra parameters, prefill/decode latency",
                       description="Score every row on the held-out part of TASK's seeded hash split (the part "
                                   "tuning never sees), count the parameters each recovery adds, time prefill and "
                                   "per-token decode (batch 1), and check the base weights stay bit-identical.")
    p.add_argument("--task", required=True, help="multiple-choice task of the suite, e.g. sciq or boolq")
    p.add_argument("--dense", help="dense model source (row 'dense')")
    p.add_argument("--dense-lora", help="a LoRA trained on the dense model (row 'dense+lora'; the CPET teacher)")
    p.add_argument("--compressed", help="compressed artifact (row 'compressed'; recoveries attach to it)")
    for flag, row, what in [("--hard-prompt", "+hard prompt", "hard prompt"), ("--soft-prompt", "+soft prompt",
                             "soft prompt"), ("--idp", "+IDP", "IDP pool"), ("--lora", "+LoRA", "LoRA"),
                            ("--cpet", "+CPET", "CPET")]:
        p.add_argument(flag, action="append", default=[], metavar="[LABEL=]DIR",
                       help=f"saved {what} directory (row '{row}'); repeat with LABEL=DIR (row '{row} LABEL') "
                            f"to compare several")
    p.add_argument("--skip-compressed-row", action="store_true",
                   help="do not score the compressed artifact itself (e.g. its row is in --include already)")
    p.add_argument("--heldout-fraction", type=float, default=0.3, help="held-out share of the task (default 0.3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the hash split (default 0; match the training run)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N held-out examples")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128, help="latency prompt length in tokens (default 128)")
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps timed (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats, median reported (default 3)")
    p.add_argument("--include", default=None, metavar="JSON",
                   help="put the rows of an earlier compare-recovery --json first (same task, split and limit)")
    p.add_argument("--json", default=None, help="write rows + protocol here")
    p.set_defaults(func=run)


def entries(args: argparse.Namespace) -> list:
    from recoup.errors import RecoupError
    from recoup.runs.compare_recovery import Entry

    rows = []
    if args.dense:
        rows.append(Entry("dense", args.dense))
        if args.dense_lora:
            rows.append(Entry("dense+lora", args.dense, args.dense_lora))
    elif args.dense_lora:
        raise RecoupError("--dense-lora needs --dense")
    attached = []
    for row, items in [("+hard prompt", args.hard_prompt), ("+soft prompt", args.soft_prompt), ("+IDP", args.idp),
                       ("+LoRA", args.lora), ("+CPET", args.cpet)]:
        for item in items:
            label, _, path = item.rpartition("=") if "=" in item.split("/")[0] else ("", "", item)
            attached.append((f"{row} {label}" if label else row, path))
    labels = [label for label, _ in attached]
    if len(set(labels)) != len(labels):
        raise RecoupError(f"two rows are labelled '{next(x for x in labels if labels.count(x) > 1)}'; "
                          f"name them with LABEL=DIR")
    if args.skip_compressed_row and not args.compressed:
        raise RecoupError("--skip-compressed-row needs --compressed (the recoveries attach to it)")
    if args.compressed:
        if not args.skip_compressed_row:
            rows.append(Entry("compressed", args.compressed))
        rows += [Entry(label, args.compressed, path) for label, path in attached if path]
    elif any(path for _, path in attached):
        raise RecoupError("recoveries attach to --compressed; give the compressed artifact")
    if not rows:
        raise RecoupError("nothing to compare: give --dense and/or --compressed (with recoveries)")
    return rows


def run(args: argparse.Namespace) -> int:
    from recoup.errors import RecoupError
    from recoup.runs.compare_recovery import LatencyConfig, compare, format_table, merge

    if args.limit is not None and args.limit < 1:
        raise RecoupError(f"--limit must be positive (got {args.limit})")
    latency = LatencyConfig(args.prompt_len, args.new_tokens, args.repeats)
    earlier = None
    if args.include:
        try:
            earlier = json.loads(Path(args.include).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RecoupError(f"--include {args.include}: not a compare-recovery JSON ({type(exc).__name__})") from None
    result = compare(entries(args), args.task, args.heldout_fraction, args.seed, args.batch_size, latency, args.limit)
    if earlier is not None:
        result = merge(earlier, result)
    print(format_table(result))
    p = result["protocol"]
    print(f"\ntask {p['task']}: held-out {p['n_heldout']} of {p['n_heldout'] + p['n_train']} (fraction "
          f"{p['heldout_fraction']}, seed {p['seed']}); latency batch 1, prompt {p['latency']['prompt_len']} tokens, "
          f"{p['latency']['new_tokens']} decode steps, median of {p['latency']['repeats']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0
