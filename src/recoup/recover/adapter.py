"""The unmerged PEFT LoRA adapter that the low-rank recoveries produce (lora trains it, eora computes it, cpet
trains it beside its recovery modules), and the keys those methods share (:class:`LoraMethodConfig`).

LoRA (Hu et al. 2021) adds ``B @ A`` (A: (r, in), B: (out, r)) beside each targeted linear; the targets come from
the anatomy map (attention, mlp or all linears of every decoder layer). The adapter is **never merged** into the
base: merging ``W + BA`` would fill the pruned zeros of a sparse weight and move a quantized weight off its grid.
Its saved directory is a plain PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) that
``peft.PeftModel.from_pretrained`` loads, plus ``recoup_recovery.json``. Per-module ranks (an energy-ranked EoRA,
a LoRA inheriting one) become PEFT's ``rank_pattern`` / ``alpha_pattern``.

A shared module, not a method: it defines no ``METHOD``; ``init=eora`` reaches EoRA through the registry.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from recoup.config import Config, check
from recoup.errors import RecoupError
from recoup.model.anatomy import anatomy
from recoup.model.recovery import PEFT_CONFIG, PEFT_WEIGHTS, RECOVERY_RECORD, Recovery
from recoup.recover.base import base_of, peft_base_path
from recoup.recover.train import FitConfig

TARGETS = ("attention", "mlp", "all")


@dataclasses.dataclass
class LoraConfig(Config):
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "all"  # attention | mlp | all (from the anatomy map)

    def __post_init__(self) -> None:
        check(self.rank >= 1, f"--rank must be >= 1 (got {self.rank})")
        check(self.alpha > 0, f"LoRA alpha must be > 0 (got {self.alpha})")
        check(0 <= self.dropout < 1, f"LoRA dropout must be in [0, 1) (got {self.dropout})")
        check(self.targets in TARGETS, f"unknown LoRA targets '{self.targets}'; use one of {', '.join(TARGETS)}")


def _peft_config(cfg: LoraConfig, target_modules: list[str]):
    import peft

    return peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


class LoraRecovery(Recovery):
    """A LoRA adapter: config, target leaf names and the PEFT state dict (keys as PEFT saves them)."""

    method = "lora"

    def __init__(
        self,
        cfg: LoraConfig,
        target_modules: list[str],
        state: dict[str, torch.Tensor] | None = None,
        hidden_size: int | None = None,
        meta: dict | None = None,
    ) -> None:
        self.cfg = cfg
        self.target_modules = list(target_modules)
        self.state = state
        self.hidden_size = hidden_size
        self.meta = dict(meta or {})

    @classmethod
    def for_model(cls, model: nn.Module, cfg: LoraConfig) -> "LoraRecovery":
        ana = anatomy(base_of(model))
        return cls(cfg, ana.peft_target_modules(cfg.targets), hidden_size=ana.hidden_size)

    def ranks(self) -> dict[str, int]:
        """Each adapted module's rank (``lora_A``'s rows), keyed by module name (as PEFT matches it)."""
        prefix, suffix = "base_model.model.", ".lora_A.weight"
        return {
            k[len(prefix) : -len(suffix)]: int(v.shape[0])
            for k, v in (self.state or {}).items()
            if k.startswith(prefix) and k.endswith(suffix)
        }

    def peft_config(self):
        """The ``peft.LoraConfig`` this adapter is built and saved with. Modules whose rank (read from the
        tensors) differs from ``cfg.rank`` (an energy-ranked EoRA, a LoRA inheriting one) become PEFT's
        ``rank_pattern``, with ``alpha_pattern`` keeping every module's scaling at ``alpha / rank``. ``cfg.rank``
        is the largest: tensors that do not fit that (a config of another rank) get no pattern and are refused
        by :meth:`load_into`."""
        pcfg = _peft_config(self.cfg, self.target_modules)
        ranks = self.ranks()
        pattern = {name: r for name, r in ranks.items() if r != self.cfg.rank}
        if pattern and max(ranks.values()) == self.cfg.rank:
            scale = self.cfg.alpha / self.cfg.rank
            pcfg.rank_pattern = pattern
            pcfg.alpha_pattern = {name: scale * r for name, r in pattern.items()}
        return pcfg

    # ------------------------------------------------------------------ attach
    def apply(self, model: nn.Module, seed: int | None = None) -> nn.Module:
        """Wrap ``model`` with the adapter (unmerged) and load the saved weights; returns the PeftModel.

        With no saved state the adapter starts from PEFT's init (A Kaiming-uniform, B = 0) under
        ``seed``, so the wrapped model computes exactly what the base computes.
        """
        import peft

        ana = anatomy(base_of(model))
        if self.hidden_size is not None and ana.hidden_size != self.hidden_size:
            raise RecoupError(
                f"the adapter was trained for hidden size {self.hidden_size}, the model has "
                f"{ana.hidden_size}; a LoRA attaches only to the same architecture"
            )
        if seed is not None:
            torch.manual_seed(seed)
        with warnings.catch_warnings():  # PEFT reads transformers 5's deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            wrapped = peft.get_peft_model(model, self.peft_config())
        if self.state is not None:
            self.load_into(wrapped, self.state)
        return wrapped

    @staticmethod
    def load_into(wrapped: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Copy a PEFT LoRA state dict into a wrapped model; a shape or key mismatch is one clear line."""
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        # save_embedding_layers=False: the adapter never resizes embeddings, and PEFT's "auto" would reload the
        # base's config to check (a Hub request for a hub id offline; a model-type warning for a packed artifact)
        own = get_peft_model_state_dict(wrapped, save_embedding_layers=False)
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        if missing or extra:
            raise RecoupError(
                f"the LoRA does not fit this model: {len(missing)} adapter tensors missing "
                f"(e.g. {missing[:1]}), {len(extra)} unexpected (e.g. {extra[:1]})"
            )
        for key, value in state.items():
            if own[key].shape != value.shape:
                raise RecoupError(
                    f"the LoRA does not fit this model: {key} has shape {tuple(value.shape)}, "
                    f"the model needs {tuple(own[key].shape)} (another rank or architecture?)"
                )
        set_peft_model_state_dict(wrapped, state)

    def capture(self, wrapped: nn.Module) -> None:
        """Keep a detached copy of the wrapped model's adapter weights."""
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(wrapped, save_embedding_layers=False)
        self.state = {k: v.detach().to("cpu").clone() for k, v in state.items()}

    # ------------------------------------------------------------------ lifecycle
    def num_parameters(self) -> int:
        if self.state is None:
            raise RecoupError("the LoRA has no weights yet (train it or load a saved one)")
        return int(sum(v.numel() for v in self.state.values()))

    def describe(self) -> dict:
        return {
            "method": self.method,
            "parameters": self.num_parameters(),
            "rank": self.cfg.rank,
            "alpha": self.cfg.alpha,
            "targets": self.target_modules,
            "merged": False,
            **self.meta,
        }

    def save(self, path: str | Path) -> None:
        """Write a PEFT LoRA directory (``adapter_config.json``, ``adapter_model.safetensors``)."""
        from safetensors.torch import save_file

        if self.state is None:
            raise RecoupError("nothing to save: the LoRA has no weights")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        pcfg = self.peft_config()
        pcfg.base_model_name_or_path = peft_base_path(self.meta.get("base_model") or self.meta.get("source"))
        pcfg.save_pretrained(str(path))
        save_file({k: v.contiguous() for k, v in self.state.items()}, str(path / PEFT_WEIGHTS))
        info = {
            "method": self.method,
            "config": self.cfg.to_dict(),
            "target_modules": self.target_modules,
            "hidden_size": self.hidden_size,
            "merged": False,
            **self.meta,
        }
        (path / RECOVERY_RECORD).write_text(json.dumps(info, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "LoraRecovery":
        """Read a PEFT LoRA directory (ours, or any PEFT LoRA for a supported architecture)."""
        from safetensors.torch import load_file

        path = Path(path)
        cfg_file, weights = path / PEFT_CONFIG, path / PEFT_WEIGHTS
        if not cfg_file.is_file() or not weights.is_file():
            raise RecoupError(
                f"'{path}' is not a LoRA directory (needs adapter_config.json and adapter_model.safetensors)"
            )
        raw = json.loads(cfg_file.read_text())
        if raw.get("peft_type") != "LORA":
            raise RecoupError(f"'{path}' holds a PEFT {raw.get('peft_type')} adapter, not a LoRA")
        targets = raw.get("target_modules")
        if isinstance(targets, str) or not targets:
            raise RecoupError(f"'{path}': adapter_config.json must list target_modules explicitly")
        cfg = LoraConfig(
            rank=int(raw["r"]), alpha=float(raw["lora_alpha"]), dropout=float(raw.get("lora_dropout", 0.0))
        )
        ranks, alphas = raw.get("rank_pattern") or {}, raw.get("alpha_pattern") or {}
        scale = cfg.alpha / cfg.rank
        odd = [
            k for k, a in alphas.items() if abs(float(a) - scale * int(ranks.get(k, cfg.rank))) > 1e-6 * abs(float(a))
        ]
        if odd:
            raise RecoupError(
                f"'{path}': alpha_pattern gives {odd[0]} a scaling other than lora_alpha / r = "
                f"{scale:g}; only per-module ranks at one scaling are supported"
            )
        info = json.loads((path / RECOVERY_RECORD).read_text()) if (path / RECOVERY_RECORD).is_file() else {}
        own = ("method", "config", "target_modules", "hidden_size", "merged")
        meta = {k: v for k, v in info.items() if k not in own}
        return cls(cfg, sorted(targets), load_file(str(weights)), info.get("hidden_size"), meta)


def start_meta(init: LoraRecovery | None) -> dict:
    """Where a trained adapter started, for its manifest: ``init`` random | inherited | eora (with the compensation's
    protocol: teacher, calibration, damping, seconds)."""
    if init is None:
        return {"init": "random"}
    if init.method != "eora":
        return {"init": "inherited"}
    return {"init": "eora", "eora": {k: init.meta.get(k) for k in ("teacher", "calibration", "damp", "seconds")}}


def inherited_state(init: LoraRecovery, cfg: LoraConfig) -> dict[str, torch.Tensor]:
    """A copy of ``init``'s adapter tensors for an adapter of config ``cfg``, ``lora_B`` rescaled so the update
    (alpha / r) B A stays what ``init`` computed whatever the two alphas (e.g. an EoRA saved at scaling 1)."""
    factor = (init.cfg.alpha / init.cfg.rank) / (cfg.alpha / cfg.rank)
    return {k: v.clone() * factor if ".lora_B." in k else v.clone() for k, v in init.state.items()}


def lora_parameters(wrapped: nn.Module) -> list[nn.Parameter]:
    """The adapter's trainable tensors (lora_A / lora_B) of a wrapped model."""
    params = [p for n, p in wrapped.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


LORA_INITS = ("zero", "eora")


@dataclasses.dataclass
class LoraMethodConfig(FitConfig):
    """``recoup recover --method lora`` (and cpet, which extends it): the adapter's shape, where it starts, and the
    shared training keys (adapter defaults: 150 steps, lr 1e-3, batch 8, examples of at most 256 tokens, validation
    every steps/5). It needs tuning data: a task (``task: sciq``) or a corpus / jsonl file (``data: ...``)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "all"  # attention | mlp | all, from the anatomy map
    inherit: str | None = None  # a saved LoRA or EoRA (same rank and targets) to start from instead of PEFT's init
    init: str = "zero"  # zero: PEFT's init (B = 0) | eora: start from EoRA's compensation at --rank, computed first
    calib: str = "ptb"  # init=eora: calibration corpus of the compensation
    nsamples: int = 32  # init=eora: calibration windows (of 512 tokens, EoRA's default)
    batch_size: int = 8
    steps: int = 150
    lr: float = 1e-3
    eval_every: int | None = None

    default_data: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.lora()
        check(self.init in LORA_INITS, f"init must be one of {', '.join(LORA_INITS)} for a LoRA (got '{self.init}')")
        check(
            self.init == "zero" or self.inherit is None,
            f"init={self.init} and inherit both say where the LoRA starts; give one",
        )
        check(self.nsamples >= 1, f"nsamples must be >= 1 (got {self.nsamples})")

    def initial(self, loaded) -> "LoraRecovery | None":
        """The adapter training starts from: the inherited one, EoRA's compensation of ``loaded`` (init=eora), or
        None (PEFT's init)."""
        if self.inherit:
            return LoraRecovery.load(self.inherit)
        if self.init == "eora":
            from recoup.recover.methods import RECOVERIES

            eora = RECOVERIES.get("eora")
            rec, _ = eora.fit(
                loaded,
                eora.config(
                    rank=self.rank, calib=self.calib, nsamples=self.nsamples, seed=self.seed, teacher=self.teacher
                ),
                None,
            )
            return rec
        return None

    def lora(self) -> LoraConfig:
        return LoraConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=self.targets)
