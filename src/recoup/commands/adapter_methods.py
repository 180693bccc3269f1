"""The ``lora`` and ``cpet`` methods of ``recoup recover``: their flags and how flags become configs.

``commands/recover.py`` owns the command and its method registry; it calls :func:`add_arguments` once
and dispatches ``--method lora|cpet`` to :func:`run_lora` / :func:`run_cpet` with the loaded model.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

ADAPTER_DEFAULTS = {"steps": 150, "lr": 1e-3, "batch_size": 8, "seqlen": 256}  # seqlen: max tokens per example


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of the adapter methods. The command's common flags are reused: --data, --task, --heldout-fraction
    (default 0.3), --steps, --lr, --seqlen (the cap on tokens per training example, context cut from the left),
    --batch-size, --warmup, --max-grad-norm, --eval-every, --seed (also the seed of the --task split), --time-budget."""
    g = p.add_argument_group("lora / cpet")
    g.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    g.add_argument("--targets", default="all", choices=["all", "attention", "mlp"],
                   help="linears that get LoRA, from the anatomy map (default all)")
    g.add_argument("--inherit", default=None, metavar="DENSE_LORA_DIR",
                   help="cpet: start from this LoRA trained on the dense model (and use it in the teacher)")
    g.add_argument("--recovery-modules", action="store_true", help="cpet: add recovery modules beside the linears")
    g.add_argument("--recovery-rank", type=int, default=8, help="cpet: recovery module rank (default 8)")
    g.add_argument("--recovery-targets", default="all", choices=["all", "attention", "mlp"])
    g.add_argument("--distill", action="store_true",
                   help="cpet: distil from the dense model + its LoRA (--inherit) into the compressed model")
    g.add_argument("--distill-alpha", type=float, default=1.0, help="cpet: weight of the hidden-state MSE (default 1)")
    g.add_argument("--distill-layers", default="last",
                   help="cpet: last (final normed hidden state) | all | comma list of decoder layers (default last)")
    g.add_argument("--kl-weight", type=float, default=0.0, help="cpet: weight of the logit KL term (default 0)")
    g.add_argument("--teacher", default=None, help="cpet: dense model source (default: the artifact's source model)")


def _common(args: argparse.Namespace, loaded):
    from recoup.errors import RecoupError
    from recoup.recover.task_data import tuning_data
    from recoup.recover.train import TrainConfig

    task, data = getattr(args, "task", None), getattr(args, "data", None)
    if task and data:
        raise RecoupError("give --task T or --data SRC, not both")
    if not task and not data:
        raise RecoupError("lora/cpet need tuning data: --task T (e.g. sciq) or --data SRC (corpus or .jsonl)")
    seed = args.seed if args.seed is not None else 0
    max_len = args.seqlen if args.seqlen is not None else ADAPTER_DEFAULTS["seqlen"]
    tuning = tuning_data(loaded.tokenizer, task=task or None, data=data if not task else None, max_len=max_len,
                         heldout_fraction=0.3 if args.heldout_fraction is None else args.heldout_fraction, seed=seed)
    steps = args.steps if args.steps is not None else ADAPTER_DEFAULTS["steps"]
    given = {"lr": args.lr, "warmup": getattr(args, "warmup", None), "max_grad_norm": getattr(args, "max_grad_norm", None),
             "eval_every": getattr(args, "eval_every", None), "time_budget_s": getattr(args, "time_budget", None)}
    options = {k: v for k, v in given.items() if v is not None}
    options.setdefault("lr", ADAPTER_DEFAULTS["lr"])
    options.setdefault("eval_every", max(1, steps // 5))
    train_cfg = TrainConfig(steps=steps, seed=seed, **options)
    bs = getattr(args, "batch_size", None) or ADAPTER_DEFAULTS["batch_size"]
    return tuning, train_cfg, bs


def _fingerprint(model, manifest):
    if not manifest:
        return None
    from recoup.artifact.store import compression_fingerprint
    from recoup.recover.lora import base_of

    return compression_fingerprint(base_of(model), manifest)


def _finish(rec, loaded, wrapped, before, result, out: str) -> None:
    from recoup.errors import RecoupError

    after = _fingerprint(wrapped, loaded.manifest)
    if before is not None:
        if after["digest"] != before["digest"]:
            raise RecoupError("internal error: training changed the artifact's masks or quantized values")
        rec.meta["compression_fingerprint"] = {"digest": before["digest"], "unchanged": True,
                                               "sparsity": after["sparsity"], "all_on_grid": after["all_on_grid"]}
    rec.meta["source"] = loaded.source
    rec.save(out)
    summary = {"out": out, "parameters": rec.num_parameters(), "steps": result.steps,
               "seconds": round(result.seconds, 1), "best_val_loss": result.best_val_loss,
               "best_step": result.best_step, "base_intact": True,
               "compression_intact": rec.meta.get("compression_fingerprint", {}).get("unchanged")}
    (Path(out) / "recoup_train.json").write_text(json.dumps({**summary, "history": result.to_dict()}, indent=1))
    print(json.dumps(summary))


def run_lora(args: argparse.Namespace, loaded) -> int:
    """Train a LoRA on ``loaded`` (kept unmerged) and save it as a PEFT LoRA directory at ``args.out``."""
    from recoup.recover.lora import LoraConfig, LoraRecovery, fit_lora

    tuning, train_cfg, bs = _common(args, loaded)
    cfg = LoraConfig(rank=args.rank, alpha=args.lora_alpha, targets=args.targets)
    init = LoraRecovery.load(args.inherit) if args.inherit else None
    before = _fingerprint(loaded.model, loaded.manifest)
    rec, result, wrapped = fit_lora(loaded.model, loaded.tokenizer, tuning, cfg, train_cfg, bs, init=init)
    _finish(rec, loaded, wrapped, before, result, args.out)
    return 0


def run_cpet(args: argparse.Namespace, loaded) -> int:
    """CPET on a compressed ``loaded``: --inherit, --recovery-modules, --distill switch its three parts."""
    from recoup.errors import RecoupError
    from recoup.artifact import load_model
    from recoup.recover.cpet import CpetConfig, fit_cpet, make_teacher
    from recoup.recover.lora import LoraRecovery

    tuning, train_cfg, bs = _common(args, loaded)
    cfg = CpetConfig(rank=args.rank, alpha=args.lora_alpha, targets=args.targets,
                     recovery_modules=args.recovery_modules, recovery_rank=args.recovery_rank,
                     recovery_targets=args.recovery_targets, distill=args.distill, distill_alpha=args.distill_alpha,
                     distill_layers=args.distill_layers, kl_weight=args.kl_weight)
    inherit = LoraRecovery.load(args.inherit) if args.inherit else None
    teacher = None
    if args.distill:
        if inherit is None:
            raise RecoupError("--distill needs --inherit DENSE_LORA_DIR: the teacher is the dense model + that LoRA")
        source = args.teacher or ((loaded.manifest or {}).get("source") or {}).get("model")
        if not source:
            raise RecoupError("--distill: name the dense model with --teacher (the model has no artifact manifest)")
        t0 = time.time()
        teacher = make_teacher(load_model(source, dtype=args.dtype if hasattr(args, "dtype") else "float32").model,
                               inherit)
        log.info("teacher %s + %s loaded in %.1fs", source, args.inherit, time.time() - t0)
    before = _fingerprint(loaded.model, loaded.manifest)
    rec, result, wrapped = fit_cpet(loaded.model, loaded.tokenizer, tuning, cfg, train_cfg, inherit, teacher, bs)
    rec.meta["teacher"] = args.teacher or ((loaded.manifest or {}).get("source") or {}).get("model") if args.distill else None
    _finish(rec, loaded, wrapped, before, result, args.out)
    return 0
