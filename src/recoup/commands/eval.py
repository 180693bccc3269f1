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
    p.add_argument("--tasks", default=None, help="comma-separated tasks, e.g. ppl:ptb,arc_easy,piqa (default ppl:ptb)")
    p.add_argument("--suite", default=None, help="a named task suite: kick (LLM-KICK's five families) or zeroshot")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="task option, repeatable: shots, context_tokens, max_new_tokens, cnndm_file, "
                        "instructions_file, instructions_reference, chat, factoid_template")
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible endpoint of the LLM judge (e.g. http://host/v1)")
    p.add_argument("--judge-model", default=None, help="model name sent to the judge endpoint")
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the judge's API key")
    p.add_argument("--judge-local", default=None, help="a local model source to use as the judge instead of a URL")
    p.add_argument("--judge-retries", type=int, default=3, help="attempts per judged example (default 3)")
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
    from recoup.evaluate.judge import build_judge
    from recoup.evaluate.runner import EvalSettings, evaluate, resolve_tasks
    from recoup.evaluate.tasks import parse_options
    from recoup.artifact import load_model

    if args.limit is not None and args.limit < 1:
        raise RecoupError(f"--limit must be a positive integer (got {args.limit})")
    if args.seqlen < 2:
        raise RecoupError(f"--seqlen must be at least 2 (got {args.seqlen})")
    options = parse_options(args.option)
    tasks = resolve_tasks(args.tasks if (args.tasks or args.suite) else "ppl:ptb", args.suite, options)
    judge = build_judge(args.judge_url, args.judge_model, args.judge_key_env, args.judge_local, args.judge_retries,
                        dtype=args.dtype, device=args.device)
    if judge is not None:
        options["judge"] = judge
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
    settings = EvalSettings(seqlen=args.seqlen, limit=args.limit, batch_size=args.batch_size, seed=args.seed,
                            options=options)
    out = evaluate(loaded, tasks, settings, recovery)
    for task, res in out["results"].items():
        main_metric = {k: v for k, v in res.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(main_metric.items())[:6])
        print(f"{task}: {shown}")
        if res.get("judge_error"):
            print(f"{task}: judge error after {res.get('n_judged', 0)} judged example(s), kept: {res['judge_error']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0
