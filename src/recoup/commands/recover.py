"""recoup recover MODEL --method soft-prompt|idp|... --out DIR

Built around :data:`METHODS`. A method is registered in one of two ways:

- *config-based* (soft-prompt, idp): it names a lazy ``resolve() -> (Config subclass, fit)`` and the
  flags only it takes; the command turns the given flags into the typed config (flags left out
  keep the config's defaults), calls ``fit(loaded, config) -> (Recovery, TrainResult)`` and saves.
  Flags shared by several methods (``--tokens``) are added once; a flag given to a method it does
  not belong to is an error;
- *custom*: ``add_arguments(parser)`` adds its own flags (called once per distinct function) and
  ``run(args, loaded) -> int`` trains and saves to ``args.out`` itself. E.g. for LoRA/CPET::

      def _adapter_args(p):
          from recoup.commands.adapter_methods import add_arguments
          add_arguments(p)

      def _run_lora(args, loaded):
          from recoup.commands.adapter_methods import run_lora
          return run_lora(args, loaded)

      METHODS.register("lora", RecoverMethod("lora", "LoRA, kept unmerged", add_arguments=_adapter_args,
                                             run=_run_lora))

  in :func:`_register_builtin`. The common flags (``--data --task --heldout-fraction --steps --lr --seqlen
  --batch-size --warmup --max-grad-norm --eval-every --seed --time-budget``) are always there, as
  ``args.data`` etc., ``None`` when not given.

Every training method takes either a corpus (``--data``, next-token loss on ``--seqlen`` windows; the
prompt methods' default is ptb) or a multiple-choice task (``--task``, loss on the gold continuation of
the train part of one seeded hash split, :func:`recoup.recover.task_data.tuning_data`), so prompts, IDP
pools, LoRA and CPET trained on the same task with the same ``--heldout-fraction``/``--seed`` never see
the held-out part that ``recoup compare-recovery`` scores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

from recoup.registry import Registry

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Flag:
    """One command-line flag that maps onto the config key ``key``."""

    name: str
    key: str
    kwargs: dict = dataclasses.field(default_factory=dict)

    def __init__(self, name: str, key: str, **kwargs: Any) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "kwargs", kwargs)


@dataclasses.dataclass(frozen=True)
class RecoverMethod:
    name: str
    help: str
    resolve: Callable[[], tuple[type, Callable[..., tuple]]] | None = None  # lazy: () -> (Config subclass, fit)
    flags: tuple[Flag, ...] = ()
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None  # custom methods
    run: Callable[[argparse.Namespace, Any], int] | None = None  # custom: (args, loaded) -> exit code

    @property
    def config_cls(self) -> type:
        return self.resolve()[0]

    @property
    def fit(self) -> Callable[..., tuple]:
        """(loaded, config) -> (Recovery, TrainResult)."""
        return self.resolve()[1]


METHODS: Registry[RecoverMethod] = Registry("recovery method")

# Flags every method may take; each is passed on only when the method's config has the key.
COMMON_FLAGS = (
    Flag("--data", "data", help="training text: ptb, wiki, a .txt/.jsonl file, or a comma-separated mix "
                                "(soft-prompt/idp default ptb; not with --task)"),
    Flag("--task", "task", help="train on a multiple-choice task's train part instead (e.g. sciq, arc_easy): loss on "
                                "the gold continuation; the held-out part is never seen (--heldout-fraction, --seed)"),
    Flag("--heldout-fraction", "heldout_fraction", type=float,
         help="held-out share of --task, split by a seeded hash of each example (default 0.3)"),
    Flag("--steps", "steps", type=int, help="optimizer steps"),
    Flag("--lr", "lr", type=float, help="peak learning rate (AdamW, linear warm-up and decay)"),
    Flag("--seqlen", "seqlen", type=int, help="corpus window length in tokens; with --task the cap on tokens per "
                                              "example (context cut from the left)"),
    Flag("--batch-size", "batch_size", type=int, help="windows (or task examples) per step"),
    Flag("--warmup", "warmup", type=float, help="warm-up fraction of the steps"),
    Flag("--max-grad-norm", "max_grad_norm", type=float, help="gradient clipping norm"),
    Flag("--eval-every", "eval_every", type=int, help="validate every N steps (best state kept)"),
    Flag("--seed", "seed", type=int, help="seed for initialisation, batch order and the --task split (default 0)"),
    Flag("--time-budget", "time_budget_s", type=float, help="stop after this many seconds (best state kept)"),
)

_PROMPT_FLAGS = (
    Flag("--tokens", "tokens", type=int, help="prompt length n in virtual tokens (soft-prompt, idp; default 20)"),
    Flag("--init", "init", help="prompt init: vocab (frequent-token rows), text, random (default vocab)"),
    Flag("--init-text", "init_text", help="text whose token embeddings initialise the prompt (with --init text)"),
    Flag("--val-windows", "val_windows", type=int,
         help="corpus valid-split windows scored at each validation (default 4; with --task the validation set is "
              "a seeded 64-example slice of the train part)"),
)


def _soft_prompt():
    from recoup.recover.soft_prompt import SoftPromptConfig, fit_soft_prompt

    return SoftPromptConfig, fit_soft_prompt


def _idp():
    from recoup.recover.idp import IDPConfig, fit_idp

    return IDPConfig, fit_idp


def _register_builtin() -> None:
    METHODS.register("soft-prompt", RecoverMethod(
        "soft-prompt", "Compress-Then-Prompt soft prompt (Xu et al. 2023)", _soft_prompt, _PROMPT_FLAGS))
    METHODS.register("idp", RecoverMethod(
        "idp", "Inference-time Dynamic Prompting pool (Hoang et al. 2023)", _idp,
        _PROMPT_FLAGS + (Flag("--pool", "pool", type=int, help="prompts in the IDP pool m (idp; default 4)"),
                         Flag("--select-layers", "select_layers", type=int,
                              help="score the pool on the first K decoder layers only, a cheaper selection pass "
                                   "(idp; default 0 = all layers)"))))
    METHODS.register("lora", RecoverMethod("lora", "LoRA through PEFT, kept unmerged (Hu et al. 2021)",
                                           add_arguments=_adapter_args, run=_run_lora))
    METHODS.register("cpet", RecoverMethod("cpet", "CPET / CA-LoRA: inheritance, recovery modules, distillation "
                                                   "(Zhao et al. 2023)", add_arguments=_adapter_args, run=_run_cpet))


def _adapter_args(p: argparse.ArgumentParser) -> None:
    from recoup.commands.adapter_methods import add_arguments

    add_arguments(p)


def _run_lora(args: argparse.Namespace, loaded) -> int:
    from recoup.commands.adapter_methods import run_lora

    return run_lora(args, loaded)


def _run_cpet(args: argparse.Namespace, loaded) -> int:
    from recoup.commands.adapter_methods import run_cpet

    return run_cpet(args, loaded)


_register_builtin()


def all_flags() -> list[Flag]:
    """Common flags, then every method's, each name once (first definition wins)."""
    seen: dict[str, Flag] = {}
    for flag in COMMON_FLAGS:
        seen[flag.name] = flag
    for name in METHODS.names():
        for flag in METHODS.get(name).flags:
            seen.setdefault(flag.name, flag)
    return list(seen.values())


def dest(flag: Flag) -> str:
    return flag.name.lstrip("-").replace("-", "_")


def register(sub) -> None:
    p = sub.add_parser("recover", help="learn a recovery (soft prompt, IDP pool, ...) on a model or artifact",
                       description="Learn a recovery on MODEL (usually a compressed artifact), whose weights stay "
                                   "bit-identical, and save it to --out; attach it with `recoup eval ... --recovery "
                                   "DIR` to this or any model of the same hidden size.")
    p.add_argument("model", help="model source (a recoup artifact, smollm2-135m, a local HF directory ...)")
    p.add_argument("--method", required=True, help=f"one of: {', '.join(METHODS.names())}")
    p.add_argument("--out", required=True, help="directory to write the recovery to")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    p.add_argument("--dtype", default="float32", help="model dtype while training (default float32)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    for flag in all_flags():
        p.add_argument(flag.name, dest=dest(flag), default=None,
                       **{"metavar": flag.key.upper(), **flag.kwargs})
    added: list[Callable] = []
    for name in METHODS.names():
        extra = METHODS.get(name).add_arguments
        if extra is not None and extra not in added:
            extra(p)
            added.append(extra)
    p.set_defaults(func=run)


def method_config(method: RecoverMethod, args: argparse.Namespace):
    """The method's typed config from the flags the user gave (None = not given -> the config default)."""
    from recoup.errors import RecoupError

    own = {f.name for f in COMMON_FLAGS} | {f.name for f in method.flags}
    fields = set(method.config_cls.field_names())
    options: dict[str, Any] = {}
    for flag in all_flags():
        value = getattr(args, dest(flag), None)
        if value is None:
            continue
        if flag.name not in own or flag.key not in fields:
            raise RecoupError(f"{flag.name} does not apply to --method {method.name}")
        options[flag.key] = value
    return method.config_cls.from_dict(options, where=f"--method {method.name}")


def run(args: argparse.Namespace) -> int:
    from recoup.errors import RecoupError
    from recoup.artifact import load_model

    method = METHODS.get(args.method)
    config = method_config(method, args) if method.run is None else None
    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise RecoupError(f"--out '{out}' exists and is not empty; choose another directory or pass --force")
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    if method.run is not None:
        return int(method.run(args, loaded) or 0)
    started = time.time()
    recovery, result = method.fit(loaded, config)
    recovery.save(out)
    summary = {"model": args.model, "method": method.name, "config": config.to_dict(), "out": str(out),
               "steps": result.steps, "seconds": round(result.seconds, 1), "cpu_seconds": result.cpu_seconds,
               "tokens": result.tokens,
               "best_val_loss": result.best_val_loss, "best_step": result.best_step,
               "parameters": recovery.num_parameters(), "total_seconds": round(time.time() - started, 1)}
    (out / "recoup_run.json").write_text(json.dumps(summary, indent=2))
    best = f"{math.exp(result.best_val_loss):.3f}" if result.best_val_loss is not None else "n/a"
    print(f"{method.name}: {result.steps} steps, {result.tokens} tokens, {result.seconds:.1f}s "
          f"({result.cpu_seconds or 0:.1f} CPU s); "
          f"best validation ppl {best} (step {result.best_step}); {recovery.num_parameters()} parameters")
    print(f"saved to {out}")
    return 0
