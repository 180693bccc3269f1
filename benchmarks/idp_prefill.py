"""Benchmark IDP's one-prefill mode (Hoang et al. 2023, IDP) on a real model.

1. ``--part latency``: prefill milliseconds (``prefix`` + one forward filling the KV cache, logits of the last
   position only, as the Scorer runs it) of ``--batch`` PTB-test inputs of ``--seqlen`` tokens, median of
   ``--repeats`` rounds (each round times every case once; one warm-up round first), for: the model alone, a
   single soft prompt of ``--tokens``, an IDP pool of ``--pool`` x ``--tokens`` in one-prefill mode (K = 1 and
   ``--select-layers``), and the old two-pass mode with K = ``--select-layers`` and with all layers. Prompts are
   vocabulary rows: latency does not depend on their values. The ratio to the soft prompt is taken within each
   round (the machine's load drifts between rounds) and its median reported.
2. ``--part select``: which K. An untrained pool (vocabulary rows of frequent PTB-train tokens, as ``fit_idp``
   initialises it) and PTB-test windows; one eager pass scoring every layer gives the first-K-layer scores for
   every K at once (layers 1..K compute the same whatever K is); per-prompt statistics from ``--windows``
   windows, choices on ``--windows`` others: agreement of the K-layer choice with the all-layer choice, the
   choice histogram, and the PTB loss of the one-prefill forward with each K (the no-prompt loss beside it).

    OMP_NUM_THREADS=1 python benchmarks/idp_prefill.py --part latency
    OMP_NUM_THREADS=1 python benchmarks/idp_prefill.py --part select

Prints a table and writes JSON under benchmarks/results/idp_prefill/.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def prefill_s(model, ids: torch.Tensor, recovery) -> float:
    """Seconds of prefix + the prefill forward (KV cache filled, last position's logits)."""
    from recoup.model.forward import build_inputs

    mask = torch.ones_like(ids)
    with torch.no_grad():
        t0 = time.perf_counter()
        prefix = recovery.prefix(model, ids, mask) if recovery is not None else None
        model(**build_inputs(model, ids, mask, prefix), use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t0


def latency(args, loaded) -> dict:
    from recoup.data.calibration import calibration_windows
    from recoup.recover.idp import IDPPool
    from recoup.recover.soft_prompt import SoftPrompt

    model = loaded.model
    model.eval()
    emb = model.get_input_embeddings().weight.detach()
    rows_ = torch.randint(0, emb.shape[0], (args.pool, args.tokens), generator=torch.Generator().manual_seed(0))
    pool = emb[rows_].clone()
    ids = calibration_windows(loaded.tokenizer, "ptb", args.batch, args.seqlen, seed=1, split="test").input_ids
    k = args.select_layers
    size = f"{args.pool}x{args.tokens}"
    cases = [("model alone", None), (f"soft prompt ({args.tokens} tokens)", SoftPrompt(pool[0]))]
    cases += [(f"IDP one-prefill {size}, K={j}", IDPPool(pool, select_layers=j)) for j in sorted({1, k})]
    cases += [
        (f"IDP two-pass {size}, K={k}", IDPPool(pool, select_layers=k, selection="two-pass")),
        (f"IDP two-pass {size}, all layers", IDPPool(pool, select_layers=0, selection="two-pass")),
    ]
    times: list[list[float]] = [[] for _ in cases]
    for rnd in range(args.repeats + 1):  # rounds over all cases (round 0 warms up): drift in load hits all alike
        for i, (_, rec) in enumerate(cases):
            t = prefill_s(model, ids, rec)
            if rnd:
                times[i].append(t)
        logging.warning("round %d done", rnd)
    rows = [
        {"name": name, "prefill_ms": 1000 * statistics.median(t), "runs_ms": [1000 * x for x in t]}
        for (name, _), t in zip(cases, times)
    ]
    print(
        f"prefill, batch {args.batch} x {args.seqlen} tokens, median of {args.repeats} rounds; "
        f"torch threads {torch.get_num_threads()}; 'vs soft prompt': median over rounds of the same round's ratio"
    )
    print(f"{'':44s} {'ms':>9s} {'vs soft prompt':>15s}")
    for r, t in zip(rows, times):
        r["vs_soft_prompt"] = statistics.median(a / b for a, b in zip(t, times[1])) - 1  # paired by round
        print(f"{r['name']:44s} {r['prefill_ms']:9.0f} {100 * r['vs_soft_prompt']:+14.1f}%")
    return {"rows": rows}


def select(args, loaded) -> dict:
    from recoup.data.calibration import calibration_windows
    from recoup.model.forward import forward_logits
    from recoup.model.prompt_pool import pool_prefill
    from recoup.recover.idp import IDPConfig, IDPPool
    from recoup.recover.soft_prompt import init_embeddings

    model, tok = loaded.model, loaded.tokenizer
    model.eval()
    layers = model.config.num_hidden_layers
    cfg = IDPConfig(pool=args.pool, tokens=args.tokens)
    train_ids = calibration_windows(tok, "ptb", 64, 256, seed=0).input_ids.flatten()
    rows_ = init_embeddings(model, tok, cfg, train_ids, args.pool * args.tokens).view(args.pool, args.tokens, -1)
    windows = calibration_windows(tok, "ptb", 2 * args.windows, args.seqlen, seed=1, split="test").input_ids
    scorer = IDPPool(rows_, select_layers=layers)
    per_layer = []
    with torch.no_grad():
        for x in windows.split(args.batch):
            scorer.scores(model, x)
            per_layer.append(torch.stack(pool_prefill(model).last.layer_scores) / x.shape[1])  # (L, B, m)
    cum = torch.cat(per_layer, 1).cumsum(0)  # (L, 2W, m): the first-K-layer raw scores for K = 1..L
    stats, held = cum[:, : args.windows], cum[:, args.windows :]
    mean, std = stats.mean(1), stats.std(1, unbiased=False).clamp(min=1e-6)
    z = (held - mean[:, None]) / std[:, None]
    choice, raw_choice = z.argmax(-1), held.argmax(-1)  # (L, W)
    test = windows[args.windows :]

    def loss(rec) -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for x in test.split(args.batch):
                prefix = rec.prefix(model, x, torch.ones_like(x)) if rec is not None else None
                logits = forward_logits(model, x, None, prefix)[:, :-1].float()
                total += F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
                ).item()
                count += x[:, 1:].numel()
        return total / count

    base = loss(None)
    rows = []
    for k in sorted({k for k in args.ks if k <= layers} | {layers}):
        rec = IDPPool(rows_, score_mean=mean[k - 1], score_std=std[k - 1], select_layers=k)
        got = loss(rec)
        assert rec.choices == choice[k - 1].tolist()  # the forward chose what the one scoring pass says
        rows.append(
            {
                "K": k,
                "agree_all_layers": float((choice[k - 1] == choice[-1]).float().mean()),
                "agree_all_layers_raw": float((raw_choice[k - 1] == raw_choice[-1]).float().mean()),
                "histogram": torch.bincount(choice[k - 1], minlength=args.pool).tolist(),
                "ptb_loss": got,
            }
        )
        logging.warning("K=%d loss %.4f", k, got)
    print(
        f"untrained pool {args.pool}x{args.tokens}; stats on {args.windows}, choices on {args.windows} PTB-test "
        f"windows of {args.seqlen}; loss without a prompt {base:.4f}; torch threads {torch.get_num_threads()}"
    )
    print(f"{'K':>3s} {'agree (std.)':>12s} {'agree (raw)':>11s} {'PTB loss':>9s}  choices per prompt")
    for r in rows:
        print(
            f"{r['K']:3d} {r['agree_all_layers']:12.2f} {r['agree_all_layers_raw']:11.2f} {r['ptb_loss']:9.4f}  "
            f"{r['histogram']}"
        )
    return {"rows": rows, "loss_without_prompt": base, "layers": layers}


def main() -> None:
    from recoup.artifact import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["latency", "select"], required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pool", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--select-layers", type=int, default=2, help="K of the latency rows")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=None, help="input tokens (latency 256, select 128)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--windows", type=int, default=16, help="select: windows for the statistics, and as many scored")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 12])
    ap.add_argument("--json", default=None, help="default benchmarks/results/idp_prefill/<part>.json")
    args = ap.parse_args()
    args.seqlen = args.seqlen or (256 if args.part == "latency" else 128)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    loaded = load_model(args.model)
    result = (latency if args.part == "latency" else select)(args, loaded)
    out = Path(args.json or f"benchmarks/results/idp_prefill/{args.part}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model": args.model,
                "args": vars(args),
                **result,
                "torch": torch.__version__,
                "python": platform.python_version(),
                "threads": torch.get_num_threads(),
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
