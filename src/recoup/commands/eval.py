"""recoup eval MODEL --tasks ..."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model, an artifact, or either with a recovery attached",
                       description="Evaluate MODEL (smollm2-135m, a .gguf file, a local HF directory, a recoup "
                                   "artifact or a hub id) on perplexity (ppl:ptb, ppl:wiki, ppl:FILE) and tasks.")
    p.add_argument("model", help="model source")
    p.add_argument("--tasks", default="ppl:ptb", help="comma-separated tasks, e.g. ppl:ptb,ppl:wiki (default ppl:ptb)")
    p.add_argument("--seqlen", type=int, default=2048, help="perplexity window length in tokens (default 2048)")
    p.add_argument("--limit", type=int, default=None, help="at most N perplexity windows / N examples per task")
    p.add_argument("--batch-size", type=int, default=8, help="batch size for task scoring (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampled task subsets (default 0)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default float32)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    p.add_argument("--recovery", default=None, help="directory of a saved recovery (prompt or adapter) to attach")
    p.add_argument("--prompt-text", default=None, help="a hard prompt: text prepended (as token embeddings, never "
                                                       "scored) to every input")
    p.add_argument("--json", default=None, help="write results JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from recoup.errors import RecoupError
    from recoup.evaluate.runner import EvalSettings, evaluate, split_task_list
    from recoup.model.load import load_model

    if args.limit is not None and args.limit < 1:
        raise RecoupError(f"--limit must be a positive integer (got {args.limit})")
    if args.seqlen < 2:
        raise RecoupError(f"--seqlen must be at least 2 (got {args.seqlen})")
    tasks = split_task_list(args.tasks)
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    recovery = None
    if args.recovery:
        from recoup.recover.io import load_recovery

        recovery = load_recovery(args.recovery)
    if args.prompt_text is not None:
        from recoup.recover.hard_prompt import HardPrompt

        if recovery is not None:
            raise RecoupError("give either --recovery or --prompt-text, not both")
        recovery = HardPrompt.from_text(args.prompt_text, loaded.tokenizer)
    settings = EvalSettings(seqlen=args.seqlen, limit=args.limit, batch_size=args.batch_size, seed=args.seed)
    out = evaluate(loaded, tasks, settings, recovery)
    for task, res in out["results"].items():
        main_metric = {k: v for k, v in res.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(main_metric.items())[:6])
        print(f"{task}: {shown}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0
