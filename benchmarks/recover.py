"""Benchmark prompt recovery: training throughput against PEFT's prompt tuning, and inference latency.

1. Training tokens/s of one soft-prompt step (forward, backward to the prompt, clip, AdamW) through
   recoup's forward (:func:`recoup.recover.task_data.lm_loss`) and through ``peft``'s own
   ``PromptTuningConfig`` model, on the same model, the same PTB-train windows, the same initial
   prompt and the same objective (PEFT labels with the first input token masked, so both score the
   same T-1 tokens). The first step of each is a warm-up and is not timed.
2. Latency, batch 1 (:func:`recoup.evaluate.latency.measure_latency`): prefill of a ``--prompt-len``
   token input and per-token greedy decode with the KV cache, for the model alone, + a soft prompt
   of ``--tokens``, + an IDP pool of ``--pool`` x ``--tokens`` (one-prefill: the choice is made inside the
   prefill; a saved two-pass pool's prefill includes its selection pass; see benchmarks/idp_prefill.py),
   + an unmerged LoRA (``--lora-rank R`` on every linear, or a saved ``--lora``: the two low-rank products an
   adapter adds to every linear on every token), and a tuned artifact of the same model (``--tuned``: recovery
   inside the weights, nothing attached). ``--rounds N`` times every row once per round, in turn, so the load on a
   shared machine falls on every row alike; the "x alone" columns are each row's ratio to the model alone.

    python benchmarks/recover.py --model /work/artifacts/smollm2-8x --steps 4 --json benchmarks/results/recover.json

Prints a table and writes JSON. Trained prompts can be given with --prompt/--idp; otherwise prompts
are initialised from vocabulary rows (latency does not depend on the values).
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


def train_throughput(loaded, windows: torch.Tensor, init: torch.Tensor, lr: float, use_peft: bool) -> dict:
    """Median seconds per step and tokens/s over ``windows`` (steps, B, T); step 0 is a warm-up."""
    from recoup.recover.losses import lm_loss
    from recoup.recover.soft_prompt import SoftPrompt, frozen

    model = loaded.model
    if use_peft:
        from peft import PromptTuningConfig, TaskType, get_peft_model

        peft_model = get_peft_model(
            model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=init.shape[0])
        )
        emb = peft_model.prompt_encoder["default"].embedding.weight
        with torch.no_grad():
            emb.copy_(init)
        params = [emb]

        def step_loss(x: torch.Tensor) -> torch.Tensor:
            labels = x.clone()
            labels[:, 0] = -100
            return peft_model(input_ids=x, attention_mask=torch.ones_like(x), labels=labels).loss
    else:
        prompt = SoftPrompt(init)
        params = [prompt.embeddings]

        def step_loss(x: torch.Tensor) -> torch.Tensor:
            return lm_loss(model, x, prompt.prefix(model, x, x))

    opt = torch.optim.AdamW(params, lr=lr)
    times, losses = [], []
    ctx = frozen(model) if not use_peft else _nothing()
    with ctx:
        for i, x in enumerate(windows):
            t0 = time.perf_counter()
            loss = step_loss(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if i:
                times.append(time.perf_counter() - t0)
            losses.append(loss.item())
    sec = statistics.median(times)
    return {"sec_per_step": sec, "tokens_per_s": windows[0].numel() / sec, "timed_steps": len(times), "losses": losses}


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def main() -> None:
    from recoup.artifact import load_model
    from recoup.data.calibration import calibration_windows
    from recoup.evaluate.latency import LatencyConfig, measure_latency
    from recoup.recover.adapter import LoraConfig, LoraRecovery, lora_parameters
    from recoup.recover.idp import IDPPool
    from recoup.recover.methods import load_recovery
    from recoup.recover.soft_prompt import SoftPrompt

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="model source (usually a compressed artifact)")
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--pool", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="training steps per implementation (first is a warm-up)")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--prompt", default=None, help="a saved soft prompt for the latency rows")
    ap.add_argument("--idp", default=None, help="a saved IDP pool for the latency rows")
    ap.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        help="also time the model with an unmerged LoRA of this rank on every linear (PEFT's init; latency does "
        "not depend on the values), or give --lora",
    )
    ap.add_argument("--lora", default=None, help="a saved LoRA / EoRA adapter for the latency rows (kept unmerged)")
    ap.add_argument(
        "--tuned",
        default=None,
        help="a tuned artifact (`recoup recover --method tune`) of --model, timed as a model with nothing attached",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="latency rounds: every row is timed once per round, in turn, so load on the machine falls on every "
        "row alike; each figure is the median over rounds of a round's median",
    )
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--json", default="benchmarks/results/recover.json")
    args = ap.parse_args()
    if args.rounds < 1 or args.lora_rank < 0:
        ap.error("--rounds must be >= 1 and --lora-rank >= 0")
    for flag, path in (("--tuned", args.tuned), ("--lora", args.lora), ("--prompt", args.prompt), ("--idp", args.idp)):
        if path and not Path(path).is_dir():
            ap.error(f"{flag} {path}: no such directory")
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    loaded = load_model(args.model)
    emb = loaded.model.get_input_embeddings().weight.detach()
    init = emb[torch.randint(0, emb.shape[0], (args.tokens,))].clone()
    rows = []
    if not args.skip_train:
        calib = calibration_windows(loaded.tokenizer, "ptb", args.steps * args.batch_size, args.seqlen, seed=0)
        windows = calib.input_ids.view(args.steps, args.batch_size, args.seqlen)
        for name, use_peft in (("recoup soft prompt", False), ("peft prompt tuning", True)):
            res = train_throughput(loaded, windows, init, args.lr, use_peft)
            rows.append({"kind": "train", "name": name, **res})
    prompt = load_recovery(args.prompt) if args.prompt else SoftPrompt(init)
    pool = (
        load_recovery(args.idp)
        if args.idp
        else IDPPool(emb[torch.randint(0, emb.shape[0], (args.pool * args.tokens,))].view(args.pool, args.tokens, -1))
    )
    ids = calibration_windows(loaded.tokenizer, "ptb", 1, args.prompt_len, seed=1, split="test").input_ids
    lat_cfg = LatencyConfig(args.prompt_len, args.new_tokens, args.repeats)
    timed = [
        ("model alone", loaded.model, None),
        (f"+ soft prompt ({prompt.tokens} tokens)", loaded.model, prompt),
        (f"+ IDP ({pool.size} x {pool.tokens} tokens)", loaded.model, pool),
    ]
    if args.lora or args.lora_rank:  # a second copy: PEFT wraps the linears of the model it is given in place
        lora = load_recovery(args.lora) if args.lora else None
        other = load_model(args.model).model
        if lora is None:
            lora = LoraRecovery.for_model(other, LoraConfig(rank=args.lora_rank))
        wrapped = lora.apply(other)
        extra = sum(p.numel() for p in lora_parameters(wrapped))
        timed.append((f"+ LoRA r{lora.cfg.rank} unmerged ({extra} parameters)", wrapped, None))
    if args.tuned:
        timed.append(("tuned artifact (0 extra parameters)", load_model(args.tuned).model, None))
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in timed}
    for _ in range(args.rounds):
        for name, model, rec in timed:
            res = measure_latency(model, ids, rec, lat_cfg)
            res.pop("generated")
            runs[name].append(res)
    for name, _, _ in timed:
        res = {**runs[name][0], "rounds": args.rounds}
        for key in ("prefill_ms", "decode_ms_per_token"):
            res[key] = statistics.median(r[key] for r in runs[name])
            res[key + "_rounds"] = [r[key] for r in runs[name]]
        rows.append({"kind": "latency", "name": name, **res})
    alone = rows[-len(timed)]
    for r in rows[-len(timed) :]:  # the same round's load falls on every row: ratios compare them
        r["prefill_vs_alone"] = r["prefill_ms"] / alone["prefill_ms"]
        r["decode_vs_alone"] = r["decode_ms_per_token"] / alone["decode_ms_per_token"]

    print(f"model {args.model}; torch threads {torch.get_num_threads()}")
    print(f"{'training (seqlen %d, batch %d)' % (args.seqlen, args.batch_size):44s} {'s/step':>8s} {'tokens/s':>9s}")
    for r in rows:
        if r["kind"] == "train":
            print(f"{r['name']:44s} {r['sec_per_step']:8.2f} {r['tokens_per_s']:9.1f}")
    head = f"latency (batch 1, {args.prompt_len}-token input, {args.rounds} rounds)"
    print(f"\n{head:52s} {'prefill ms':>10s} {'x alone':>7s} {'decode ms/tok':>13s} {'x alone':>7s}")
    for r in rows:
        if r["kind"] == "latency":
            print(
                f"{r['name']:52s} {r['prefill_ms']:10.1f} {r['prefill_vs_alone']:7.3f} "
                f"{r['decode_ms_per_token']:13.2f} {r['decode_vs_alone']:7.3f}"
            )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model": args.model,
                "args": vars(args),
                "rows": rows,
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
