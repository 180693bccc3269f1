"""Scorer throughput against a plain one-example-at-a-time loop, per request type, on a real model.

- loglikelihood: ARC-Easy validation requests (a seeded sample); plain = one full forward of
  context+continuation per request; Scorer = length-sorted batches, each shared context run once.
- generate: TriviaQA prompts (LLM-KICK template), greedy; plain = ``model.generate`` one prompt at a time
  (KV cache, batch 1); Scorer = batched greedy decoding with a KV cache.
- rolling: Wikipedia passages (BoolQ, test split of recoup's 80/10/10 hash split); plain = one forward per
  window; Scorer = the same disjoint windows, batched.

Tokens/s counts the tokens each method must read (request tokens: context + continuation; for generation
the new tokens). The two methods' numbers are compared too (max |delta| of log-likelihoods, identical
generated text). Prints a table and writes JSON.

    python benchmarks/eval.py --model smollm2-135m --examples 100 --json out/bench_eval.json

``--vs-lm-eval``: examples/s of recoup's Scorer against lm-evaluation-harness's ``hf`` model (``HFLM``, its
logits cache on) on the same ARC-Easy loglikelihood requests and the same weights, each at every batch size
in ``--batch-sizes``; the ratio is taken between the two best. Runs alternate (Scorer, hf) per batch size so
a change in machine load hits both. Also reports max |delta| of the per-request log-likelihoods and
whether every example's argmax choice agrees.

    python benchmarks/eval.py --vs-lm-eval --model smollm2-135m --examples 60 --batch-sizes 4,16,64 \
        --json benchmarks/results/eval/scorer_vs_lm_eval_hf.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def plain_loglikelihood(model, scorer, requests):
    out = []
    for ctx, cont in requests:
        c, x = scorer.encode_pair(ctx, cont)
        ids = torch.tensor([list(c) + list(x)])
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), -1)
        n = len(x)
        out.append(float(logp[-n - 1 : -1].gather(1, ids[0, -n:, None]).sum()))
    return out


def plain_generate(model, scorer, prompts, max_new):
    out = []
    for p in prompts:
        ids = torch.tensor([scorer.encode(p)])
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=scorer.pad_id,
                eos_token_id=scorer.eos_ids,
            )
        new = [t for t in gen[0, ids.shape[1] :].tolist() if t not in scorer.eos_ids]
        out.append(scorer.tokenizer.decode(new, skip_special_tokens=True))
    return out


def timed(fn, repeats):
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, result


def vs_lm_eval(args) -> None:
    """Scorer vs lm-eval's hf model on ARC-Easy loglikelihood requests, both at their best batch size."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from recoup.artifact import load_model
    from recoup.evaluate.metrics import argmax
    from recoup.evaluate.scorer import Scorer
    from recoup.evaluate.tasks import load_examples, requests_for
    from recoup.evaluate.tasks.common import sample_indices

    loaded = load_model(args.model)
    arc = load_examples("arc_easy")
    chosen = [arc[i] for i in sample_indices(len(arc), args.examples, args.seed)]
    requests = [r for ex in chosen for r in requests_for(ex)]
    instances = [Instance("loglikelihood", {}, r, k) for k, r in enumerate(requests)]
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    runs, outputs = [], {}
    for b in sizes:
        scorer = Scorer(loaded.model, loaded.tokenizer, batch_size=b, progress=False)
        hf = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=b, device=str(scorer.device))
        for name, fn in (
            ("recoup Scorer", lambda: scorer.loglikelihood(requests)),
            ("lm-eval hf", lambda: hf.loglikelihood(instances, disable_tqdm=True)),
        ):
            t0 = time.perf_counter()
            out = fn()
            secs = time.perf_counter() - t0
            outputs[name] = [float(x[0]) for x in out]
            runs.append(
                {
                    "method": name,
                    "batch_size": b,
                    "seconds": secs,
                    "examples_per_s": len(chosen) / secs,
                    "load_average": os.getloadavg(),
                }
            )
            print(f"{name:<14} batch {b:>3}: {secs:8.1f} s  {len(chosen) / secs:7.3f} examples/s", flush=True)
    best = {
        name: max((r for r in runs if r["method"] == name), key=lambda r: r["examples_per_s"])
        for name in ("recoup Scorer", "lm-eval hf")
    }
    diff = max(abs(a - b) for a, b in zip(outputs["recoup Scorer"], outputs["lm-eval hf"]))
    agree, pos = 0, 0
    for ex in chosen:
        k = len(ex["choices"])
        agree += argmax(outputs["recoup Scorer"][pos : pos + k]) == argmax(outputs["lm-eval hf"][pos : pos + k])
        pos += k
    ratio = best["recoup Scorer"]["examples_per_s"] / best["lm-eval hf"]["examples_per_s"]
    print(
        f"best: recoup Scorer {best['recoup Scorer']['examples_per_s']:.3f} ex/s (batch "
        f"{best['recoup Scorer']['batch_size']}), lm-eval hf {best['lm-eval hf']['examples_per_s']:.3f} ex/s (batch "
        f"{best['lm-eval hf']['batch_size']}): {ratio:.2f}x; max |delta ll| {diff:.2e}; "
        f"same choice {agree}/{len(chosen)}"
    )
    import lm_eval

    out = {
        "model": args.model,
        "task": "arc_easy (pack validation, seeded sample)",
        "examples": len(chosen),
        "requests": len(requests),
        "seed": args.seed,
        "runs": runs,
        "best": best,
        "speedup": ratio,
        "max_abs_ll_diff": diff,
        "same_choice": agree,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "lm_eval": lm_eval.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--examples", type=int, default=100, help="ARC-Easy examples (seeded sample)")
    ap.add_argument("--prompts", type=int, default=16, help="TriviaQA prompts for generation")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--passages", type=int, default=16, help="wiki passages for rolling likelihood")
    ap.add_argument("--window", type=int, default=128, help="rolling window (tokens)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="timings per method (median reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="out/bench_eval.json")
    ap.add_argument("--vs-lm-eval", action="store_true", help="Scorer vs lm-eval's hf model (needs recoup[lm-eval])")
    ap.add_argument("--batch-sizes", default="4,16,64", help="batch sizes tried by --vs-lm-eval")
    args = ap.parse_args()
    if args.vs_lm_eval:
        return vs_lm_eval(args)

    from recoup.artifact import load_model
    from recoup.data.corpora import wiki_passages
    from recoup.evaluate.scorer import Scorer
    from recoup.evaluate.tasks import factoid, load_examples, requests_for
    from recoup.evaluate.tasks.common import sample_indices

    loaded = load_model(args.model)
    model = loaded.model
    scorer = Scorer(model, loaded.tokenizer, batch_size=args.batch_size, progress=False)
    rows = []

    arc = load_examples("arc_easy")
    chosen = [arc[i] for i in sample_indices(len(arc), args.examples, args.seed)]
    requests = [r for ex in chosen for r in requests_for(ex)]
    req_tokens = sum(len(c) + len(x) for c, x in (scorer.encode_pair(*r) for r in requests))
    t_plain, all_plain, ll_plain = timed(lambda: plain_loglikelihood(model, scorer, requests), args.repeats)
    t_batch, all_batch, ll_batch = timed(lambda: scorer.loglikelihood(requests), args.repeats)
    diff = max(abs(a - b[0]) for a, b in zip(ll_plain, ll_batch))
    rows.append(
        {
            "request": "loglikelihood (ARC-Easy)",
            "examples": len(chosen),
            "requests": len(requests),
            "tokens": req_tokens,
            "plain_s": t_plain,
            "scorer_s": t_batch,
            "plain_runs_s": all_plain,
            "scorer_runs_s": all_batch,
            "max_abs_ll_diff": diff,
        }
    )

    tqa = factoid.load("triviaqa")
    prompts = [
        factoid.TEMPLATE.format(question=tqa[i]["question"]) for i in sample_indices(len(tqa), args.prompts, args.seed)
    ]
    t_plain, all_plain, g_plain = timed(lambda: plain_generate(model, scorer, prompts, args.new_tokens), args.repeats)
    t_batch, all_batch, g_batch = timed(lambda: scorer.generate(prompts, max_new_tokens=args.new_tokens), args.repeats)
    new_tokens = sum(len(scorer.encode(g)) for g in g_batch)
    rows.append(
        {
            "request": "generate (TriviaQA)",
            "examples": len(prompts),
            "requests": len(prompts),
            "tokens": new_tokens,
            "plain_s": t_plain,
            "scorer_s": t_batch,
            "plain_runs_s": all_plain,
            "scorer_runs_s": all_batch,
            "identical_text": sum(a == b for a, b in zip(g_plain, g_batch)),
        }
    )

    passages = wiki_passages("test")[: args.passages]
    windows = [w for p in passages for w in scorer.rolling_windows(scorer.encode(p), args.window)]
    rolling_tokens = sum(len(c) + len(x) for c, x in windows)

    def plain_rolling():
        total = 0.0
        for c, x in windows:
            ids = torch.tensor([list(c) + list(x)])
            with torch.no_grad():
                logp = F.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), -1)
            total += float(logp[-len(x) - 1 : -1].gather(1, ids[0, -len(x) :, None]).sum())
        return total

    t_plain, all_plain, r_plain = timed(plain_rolling, args.repeats)
    t_batch, all_batch, r_batch = timed(lambda: scorer.rolling_loglikelihood(passages, args.window), args.repeats)
    rows.append(
        {
            "request": "rolling (wiki passages)",
            "examples": len(passages),
            "requests": len(windows),
            "tokens": rolling_tokens,
            "plain_s": t_plain,
            "scorer_s": t_batch,
            "plain_runs_s": all_plain,
            "scorer_runs_s": all_batch,
            "abs_total_ll_diff": abs(r_plain - sum(s for s, _ in r_batch)),
        }
    )

    print(
        f"model {args.model}  batch {args.batch_size}  torch threads {torch.get_num_threads()}  "
        f"repeats {args.repeats} (median)"
    )
    print(
        f"{'request type':<26} {'n':>5} {'tokens':>7} {'plain tok/s':>12} {'scorer tok/s':>13} "
        f"{'plain ex/s':>11} {'scorer ex/s':>12} {'speedup':>8}"
    )
    for r in rows:
        r["plain_tokens_per_s"] = r["tokens"] / r["plain_s"]
        r["scorer_tokens_per_s"] = r["tokens"] / r["scorer_s"]
        r["plain_examples_per_s"] = r["examples"] / r["plain_s"]
        r["scorer_examples_per_s"] = r["examples"] / r["scorer_s"]
        r["speedup"] = r["plain_s"] / r["scorer_s"]
        print(
            f"{r['request']:<26} {r['examples']:>5} {r['tokens']:>7} {r['plain_tokens_per_s']:>12.1f} "
            f"{r['scorer_tokens_per_s']:>13.1f} {r['plain_examples_per_s']:>11.2f} {r['scorer_examples_per_s']:>12.2f} "
            f"{r['speedup']:>7.2f}x"
        )
    print(
        f"loglikelihood max |plain - scorer| = {rows[0]['max_abs_ll_diff']:.2e}; generate identical text "
        f"{rows[1]['identical_text']}/{rows[1]['examples']}; rolling |delta total| = {rows[2]['abs_total_ll_diff']:.2e}"
    )
    out = {
        "model": args.model,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "seed": args.seed,
        "rows": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
