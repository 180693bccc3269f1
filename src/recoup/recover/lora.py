"""LoRA recovery through PEFT, kept unmerged so a sparse or quantized base stays exactly as it was.

LoRA (Hu et al. 2021) adds ``B @ A`` (A: (r, in), B: (out, r), B initialised at zero) beside each
targeted linear; the targets come from the anatomy map (attention, mlp or all linears of every
decoder layer). The adapter is **never merged** into the base: merging ``W + BA`` would fill the
pruned zeros of a sparse weight and move a quantized weight off its grid. The base weights are
frozen, and :func:`linear_digests` lets a caller prove they are bit-identical after training.

The saved directory is a plain PEFT LoRA adapter (``adapter_config.json`` +
``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained`` loads, plus
``recoup_recovery.json`` naming the method.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import ClassVar, Iterator

import torch
from torch import nn

from recoup.config import Config, check
from recoup.errors import RecoupError
from recoup.model.anatomy import anatomy
from recoup.model.recovery import PEFT_CONFIG, PEFT_WEIGHTS, RECOVERY_RECORD as RECOVERY_JSON, Recovery
from recoup.recover.base import RecoveryMethod
from recoup.recover.train import FitConfig, TrainResult

log = logging.getLogger(__name__)

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


def base_of(model: nn.Module) -> nn.Module:
    """The underlying transformers model of a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _weight_of(module: nn.Module) -> torch.Tensor:
    return module.base_layer.weight if hasattr(module, "base_layer") else module.weight


def linear_digests(model: nn.Module) -> dict[str, str]:
    """sha256 of every targeted base weight (the frozen one under a LoRA wrapper), keyed by layer.linear.

    Equal digests before and after training prove that masks and quantized values are unchanged.
    """
    base = base_of(model)
    ana = anatomy(base)
    out = {}
    for i, layer in enumerate(ana.layers):
        for name in ana.linear_names():
            mod = layer
            for part in name.split("."):
                mod = getattr(mod, part)
            w = _weight_of(mod).detach().to("cpu").contiguous()
            out[f"{i}.{name}"] = hashlib.sha256(w.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


def peft_base_path(source: str | None) -> str | None:
    """``base_model_name_or_path`` for a saved PEFT adapter: the model source as the user gave it, made
    loadable (a local path absolute, the bundled alias its converted directory, a hub id as is)."""
    from recoup.model.load import BUNDLED_ALIAS, bundled_model_dir

    if not source:
        return None
    if source == BUNDLED_ALIAS:
        return str(bundled_model_dir())
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def _peft_config(cfg: LoraConfig, target_modules: list[str]):
    import peft

    return peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                           target_modules=target_modules, bias="none", task_type="CAUSAL_LM")


class LoraRecovery(Recovery):
    """A LoRA adapter: config, target leaf names and the PEFT state dict (keys as PEFT saves them)."""

    method = "lora"

    def __init__(self, cfg: LoraConfig, target_modules: list[str], state: dict[str, torch.Tensor] | None = None,
                 hidden_size: int | None = None, meta: dict | None = None) -> None:
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
        return {k[len(prefix):-len(suffix)]: int(v.shape[0]) for k, v in (self.state or {}).items()
                if k.startswith(prefix) and k.endswith(suffix)}

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
            raise RecoupError(f"the adapter was trained for hidden size {self.hidden_size}, the model has "
                              f"{ana.hidden_size}; a LoRA attaches only to the same architecture")
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
            raise RecoupError(f"the LoRA does not fit this model: {len(missing)} adapter tensors missing "
                              f"(e.g. {missing[:1]}), {len(extra)} unexpected (e.g. {extra[:1]})")
        for key, value in state.items():
            if own[key].shape != value.shape:
                raise RecoupError(f"the LoRA does not fit this model: {key} has shape {tuple(value.shape)}, "
                                  f"the model needs {tuple(own[key].shape)} (another rank or architecture?)")
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
        return {"method": self.method, "parameters": self.num_parameters(), "rank": self.cfg.rank,
                "alpha": self.cfg.alpha, "targets": self.target_modules, "merged": False, **self.meta}

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
        info = {"method": self.method, "config": self.cfg.to_dict(), "target_modules": self.target_modules,
                "hidden_size": self.hidden_size, "merged": False, **self.meta}
        (path / RECOVERY_JSON).write_text(json.dumps(info, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "LoraRecovery":
        """Read a PEFT LoRA directory (ours, or any PEFT LoRA for a supported architecture)."""
        from safetensors.torch import load_file

        path = Path(path)
        cfg_file, weights = path / PEFT_CONFIG, path / PEFT_WEIGHTS
        if not cfg_file.is_file() or not weights.is_file():
            raise RecoupError(f"'{path}' is not a LoRA directory (needs adapter_config.json and "
                              f"adapter_model.safetensors)")
        raw = json.loads(cfg_file.read_text())
        if raw.get("peft_type") != "LORA":
            raise RecoupError(f"'{path}' holds a PEFT {raw.get('peft_type')} adapter, not a LoRA")
        targets = raw.get("target_modules")
        if isinstance(targets, str) or not targets:
            raise RecoupError(f"'{path}': adapter_config.json must list target_modules explicitly")
        cfg = LoraConfig(rank=int(raw["r"]), alpha=float(raw["lora_alpha"]), dropout=float(raw.get("lora_dropout", 0.0)))
        ranks, alphas = raw.get("rank_pattern") or {}, raw.get("alpha_pattern") or {}
        scale = cfg.alpha / cfg.rank
        odd = [k for k, a in alphas.items() if abs(float(a) - scale * int(ranks.get(k, cfg.rank))) > 1e-6 * abs(float(a))]
        if odd:
            raise RecoupError(f"'{path}': alpha_pattern gives {odd[0]} a scaling other than lora_alpha / r = {scale:g}; "
                              f"only per-module ranks at one scaling are supported")
        info = json.loads((path / RECOVERY_JSON).read_text()) if (path / RECOVERY_JSON).is_file() else {}
        meta = {k: v for k, v in info.items() if k not in ("method", "config", "target_modules", "hidden_size", "merged")}
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


def frozen_base(wrapped: nn.Module) -> Iterator[nn.Parameter]:
    for n, p in wrapped.named_parameters():
        if "lora_" not in n:
            yield p


def fit_lora(model: nn.Module, tokenizer, data, cfg: LoraConfig, train_cfg, batch_size: int = 8,
             init: LoraRecovery | None = None, loss=None):
    """Train a LoRA on a frozen (possibly compressed) model; returns (LoraRecovery, TrainResult, wrapped).

    ``data`` is a :class:`~recoup.recover.task_data.TuningData`; ``init`` (a LoRA of the same rank and
    targets, e.g. one trained on the dense model) replaces PEFT's random init; ``loss`` (default
    :func:`~recoup.recover.task_data.prefixed_loss`) is called as ``loss(model, batch, device)``, e.g. an
    :class:`~recoup.recover.task_data.Objective`. The base weights are
    checked bit-identical after training (RecoupError otherwise). ``model`` is wrapped in place.
    """
    from recoup.recover.task_data import mean_loss, pad_id_of, prefixed_loss
    from recoup.recover.train import train

    device = next(model.parameters()).device
    before = linear_digests(model)
    rec = LoraRecovery.for_model(model, cfg) if init is None else LoraRecovery(cfg, init.target_modules,
                                                                              inherited_state(init, cfg),
                                                                              init.hidden_size)
    if init is not None and (init.cfg.rank != cfg.rank or init.target_modules != LoraRecovery.for_model(model, cfg).target_modules):
        raise RecoupError(f"the LoRA to inherit has rank {init.cfg.rank} on {init.target_modules}; "
                          f"train with the same --rank and targets")
    wrapped = rec.apply(model, seed=train_cfg.seed)
    params = lora_parameters(wrapped)
    pad = pad_id_of(tokenizer)
    batches = data.batches(batch_size, pad, train_cfg.seed)
    validate = (lambda: mean_loss(wrapped, data.valid, pad, batch_size)) if data.valid else None
    loss = prefixed_loss if loss is None else loss
    result = train(params, batches, lambda b: loss(wrapped, b, device), train_cfg, validate,
                   tokens_in=lambda b: b.tokens, desc="lora")
    if linear_digests(wrapped) != before:
        raise RecoupError("internal error: training changed the frozen base weights")
    rec.capture(wrapped)
    rec.meta.update({**start_meta(init), "base_intact": True,
                     "train": {"steps": result.steps, "seconds": round(result.seconds, 1),
                               "best_val_loss": result.best_val_loss, "best_step": result.best_step},
                     "data": data.protocol})
    return rec, result, wrapped


# ---------------------------------------------------------------------------- the method (registry entry)

LORA_INITS = ("zero", "eora")


@dataclasses.dataclass
class LoraMethodConfig(FitConfig):
    """``recoup recover --method lora``: the adapter's shape, where it starts, and the shared training keys
    (adapter defaults: 150 steps, lr 1e-3, batch 8, examples of at most 256 tokens, validation every steps/5).
    It needs tuning data: a task (``task: sciq``) or a corpus / jsonl file (``data: ...``)."""

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
        check(self.init == "zero" or self.inherit is None,
              f"init={self.init} and inherit both say where the LoRA starts; give one")
        check(self.nsamples >= 1, f"nsamples must be >= 1 (got {self.nsamples})")

    def initial(self, loaded) -> "LoraRecovery | None":
        """The adapter training starts from: the inherited one, EoRA's compensation of ``loaded`` (init=eora), or
        None (PEFT's init)."""
        if self.inherit:
            return LoraRecovery.load(self.inherit)
        if self.init == "eora":
            from recoup.recover.eora import EoraConfig, fit as fit_eora

            rec, _ = fit_eora(loaded, EoraConfig(rank=self.rank, calib=self.calib, nsamples=self.nsamples,
                                                 seed=self.seed, teacher=self.teacher))
            return rec
        return None

    def lora(self) -> LoraConfig:
        return LoraConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=self.targets)


def compression_digest(model: nn.Module, manifest: dict | None) -> dict | None:
    """The artifact's compression fingerprint (masks + quantized codes) of ``model``; None for a plain model."""
    if not manifest:
        return None
    from recoup.artifact.store import compression_fingerprint

    return compression_fingerprint(base_of(model), manifest)


def record_intact(rec: Recovery, loaded, wrapped: nn.Module, before: dict | None) -> None:
    """Prove the artifact's masks and codes are unchanged after training (RecoupError otherwise) and record
    it, with the base the recovery was learned on, in ``rec.meta``."""
    if before is not None:
        after = compression_digest(wrapped, loaded.manifest)
        if after["digest"] != before["digest"]:
            raise RecoupError("internal error: training changed the artifact's masks or quantized values")
        rec.meta["compression_fingerprint"] = {"digest": before["digest"], "unchanged": True,
                                               "sparsity": after["sparsity"], "all_on_grid": after["all_on_grid"]}
    rec.meta["source"] = loaded.source


def fit(loaded, config: LoraMethodConfig, data) -> tuple[LoraRecovery, TrainResult]:
    """The registry's fit: LoRA on ``loaded`` (kept unmerged; its compression checked unchanged)."""
    init = config.initial(loaded)
    before = compression_digest(loaded.model, loaded.manifest)
    rec, result, wrapped = fit_lora(loaded.model, loaded.tokenizer, data, config.lora(), config.train_config(),
                                    config.batch_size, init=init, loss=config.objective_loss(loaded))
    record_intact(rec, loaded, wrapped, before)
    return rec, result


METHOD = RecoveryMethod("lora", "LoRA through PEFT, kept unmerged (Hu et al. 2021)", LoraMethodConfig, fit,
                        LoraRecovery.load, peft_type="LORA")
