"""CPET / CA-LoRA (Zhao et al. 2023, "CA-LoRA: Adapting Existing LoRA for Compressed LLMs"): LoRA on a
compressed model with three switches, so each part can be ablated.

- **inheritance**: the compressed model's LoRA starts from a LoRA trained on the dense model for the
  same task (copied tensors) instead of PEFT's random init; both are then trained further;
- **recovery modules**: beside each chosen frozen linear ``y = W x`` a low-rank non-linear bypass
  ``y += U gelu(D x)`` with D: (r, in) Kaiming-uniform and U: (out, r) initialised at zero, so the
  model is unchanged at step 0;
- **distillation**: teacher = dense model + its LoRA; loss = task loss
  + ``distill_alpha`` x MSE(student hidden, teacher hidden) over non-padded positions
  + ``kl_weight`` x T^2 x KL(teacher || student) of the next-token distributions at scored positions.
  Layers (``distill_layers``): ``last`` (default) = the final normed hidden state that feeds the LM head
  (``hidden_states[-1]`` of transformers); ``all`` = every decoder layer's output; or a comma list of
  decoder-layer indices ``i`` (``hidden_states[i + 1]``; the last index means the normed final state).

The base weights are never changed: the LoRA stays unmerged and the recovery modules are separate
tensors added through forward hooks. The saved directory is a PEFT LoRA directory (PEFT loads the
LoRA part) plus ``recovery_modules.safetensors`` and ``recoup_recovery.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from recoup.config import Config, check
from recoup.errors import RecoupError
from recoup.model.anatomy import anatomy
from recoup.model.recovery import RECOVERY_RECORD as RECOVERY_JSON
from recoup.model.recovery import Recovery
from recoup.recover.adapter import (
    TARGETS,
    LoraConfig,
    LoraMethodConfig,
    LoraRecovery,
    inherited_state,
    lora_parameters,
    start_meta,
)
from recoup.recover.base import RecoveryMethod, base_of, compression_digest, linear_digests, record_intact

log = logging.getLogger(__name__)

MODULES_FILE = "recovery_modules.safetensors"


@dataclasses.dataclass
class CpetConfig(Config):
    rank: int = 8  # LoRA rank (must equal the inherited LoRA's)
    alpha: float = 16.0
    targets: str = "all"  # LoRA targets: attention | mlp | all
    recovery_modules: bool = True
    recovery_rank: int = 8
    recovery_targets: str = "all"
    distill: bool = True
    distill_alpha: float = 1.0
    distill_layers: str = "last"  # last | all | comma list of decoder-layer indices
    kl_weight: float = 0.0
    kl_temperature: float = 2.0

    def __post_init__(self) -> None:
        check(self.rank >= 1 and self.recovery_rank >= 1, "ranks must be >= 1")
        check(
            self.targets in TARGETS and self.recovery_targets in TARGETS, f"targets must be one of {', '.join(TARGETS)}"
        )
        check(self.distill_alpha >= 0 and self.kl_weight >= 0, "distill_alpha and kl_weight must be >= 0")
        check(self.kl_temperature > 0, "kl_temperature must be > 0")
        if self.distill_layers not in ("last", "all"):
            try:
                [int(x) for x in self.distill_layers.split(",")]
            except ValueError:
                raise RecoupError(
                    f"distill_layers must be 'last', 'all' or a comma list of layer indices "
                    f"(got '{self.distill_layers}')"
                ) from None

    def lora(self) -> LoraConfig:
        return LoraConfig(rank=self.rank, alpha=self.alpha, targets=self.targets)


class RecoveryModule(nn.Module):
    """``U gelu(D x)``: x (..., in) -> (..., out); D (r, in), U (out, r) zero-initialised."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.down(x.to(self.down.weight.dtype)))).to(x.dtype)


def _resolve(root: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def recovery_targets(model: nn.Module, which: str) -> dict[str, tuple[int, int]]:
    """``{"layer.linear": (in_features, out_features)}`` of the linears that get recovery modules."""
    ana = anatomy(base_of(model))
    names = {"attention": ana.spec.attention, "mlp": ana.spec.mlp, "all": ana.spec.attention + ana.spec.mlp}[which]
    out = {}
    for i, layer in enumerate(ana.layers):
        for name in names:
            mod = _resolve(layer, name)
            w = ana.weight_matrix(mod.base_layer if hasattr(mod, "base_layer") else mod)
            out[f"{i}.{name}"] = (w.shape[1], w.shape[0])
    return out


def attach_modules(model: nn.Module, modules: nn.ModuleDict) -> list:
    """Register forward hooks adding ``modules[key](x)`` to each target's output; returns the handles."""
    ana = anatomy(base_of(model))
    handles = []
    for key, rm in modules.items():
        idx, name = key.replace("/", ".").split(".", 1)
        target = _resolve(ana.layers[int(idx)], name)
        rm.to(next(target.parameters()).device)

        def hook(mod, args, output, rm=rm):
            return output + rm(args[0])

        handles.append(target.register_forward_hook(hook))
    return handles


@contextlib.contextmanager
def modules_attached(model: nn.Module, modules: nn.ModuleDict) -> Iterator[nn.Module]:
    """Recovery modules attached for the duration of a ``with`` block (hooks removed in ``finally``)."""
    handles = attach_modules(model, modules)
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def _key(name: str) -> str:
    return name.replace(".", "/")  # ModuleDict keys may not contain dots


class CpetRecovery(Recovery):
    """A LoRA (possibly inherited) plus optional recovery modules; see the module docstring."""

    method = "cpet"

    def __init__(
        self, cfg: CpetConfig, lora: LoraRecovery, modules: nn.ModuleDict | None = None, meta: dict | None = None
    ) -> None:
        self.cfg = cfg
        self.lora = lora
        self.modules = modules if modules is not None else nn.ModuleDict()
        self.meta = dict(meta or {})
        self._handles: list = []

    @staticmethod
    def new_modules(model: nn.Module, cfg: CpetConfig, seed: int = 0) -> nn.ModuleDict:
        torch.manual_seed(seed)
        return nn.ModuleDict(
            {
                _key(k): RecoveryModule(i, o, cfg.recovery_rank)
                for k, (i, o) in recovery_targets(model, cfg.recovery_targets).items()
            }
        )

    def apply(self, model: nn.Module, seed: int | None = None) -> nn.Module:
        """Wrap with the LoRA (unmerged) and hook the recovery modules in; returns the model to run."""
        wrapped = self.lora.apply(model, seed=seed)
        self._handles = attach_modules(wrapped, self.modules)
        return wrapped

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def num_parameters(self) -> int:
        return self.lora.num_parameters() + int(sum(p.numel() for p in self.modules.parameters()))

    def describe(self) -> dict:
        return {
            "method": self.method,
            "parameters": self.num_parameters(),
            "lora_parameters": self.lora.num_parameters(),
            "recovery_module_parameters": int(sum(p.numel() for p in self.modules.parameters())),
            "config": self.cfg.to_dict(),
            "merged": False,
            **self.meta,
        }

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        self.lora.save(path)  # PEFT LoRA files
        if len(self.modules):
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in self.modules.state_dict().items()},
                str(path / MODULES_FILE),
            )
        shapes = {k: [m.down.in_features, m.up.out_features, m.down.out_features] for k, m in self.modules.items()}
        info = {
            "method": self.method,
            "config": self.cfg.to_dict(),
            "modules": shapes,
            "merged": False,
            "lora": self.lora.describe(),
            **self.meta,
        }
        (path / RECOVERY_JSON).write_text(json.dumps(info, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "CpetRecovery":
        from safetensors.torch import load_file

        path = Path(path)
        info_file = path / RECOVERY_JSON
        if not info_file.is_file():
            raise RecoupError(f"'{path}' is not a CPET directory (no {RECOVERY_JSON})")
        info = json.loads(info_file.read_text())
        if info.get("method") != "cpet":
            raise RecoupError(f"'{path}' holds a '{info.get('method')}' recovery, not cpet")
        cfg = CpetConfig.from_dict(info["config"], where=str(info_file))
        lora = LoraRecovery.load(path)
        lora.hidden_size = info.get("lora", {}).get("hidden_size", lora.hidden_size)
        modules = nn.ModuleDict({k: RecoveryModule(i, o, r) for k, (i, o, r) in info.get("modules", {}).items()})
        if len(modules):
            modules.load_state_dict(load_file(str(path / MODULES_FILE)))
        meta = {k: v for k, v in info.items() if k not in ("method", "config", "modules", "merged", "lora")}
        return cls(cfg, lora, modules, meta)


# ---------------------------------------------------------------------------- distillation


def hidden_indices(cfg: CpetConfig, num_layers: int) -> list[int]:
    """Indices into transformers' ``hidden_states`` (num_layers + 1 entries) that are distilled."""
    if cfg.distill_layers == "last":
        return [num_layers]
    if cfg.distill_layers == "all":
        return list(range(1, num_layers + 1))
    idx = [int(x) for x in cfg.distill_layers.split(",")]
    bad = [i for i in idx if not 0 <= i < num_layers]
    if bad:
        raise RecoupError(f"distill layer {bad[0]} out of range: the model has {num_layers} decoder layers")
    return [i + 1 for i in idx]


def distill_loss(
    student_hidden: list[torch.Tensor],
    teacher_hidden: list[torch.Tensor],
    mask: torch.Tensor,
    student_logits: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    alpha: float = 1.0,
    kl_weight: float = 0.0,
    temperature: float = 2.0,
) -> torch.Tensor:
    """alpha x mean MSE of hidden states (each (B, T, H), over positions where ``mask`` (B, T) is 1)
    + kl_weight x the recovery losses' one KD term (:func:`recoup.recover.losses.kd_loss`: T^2 x KL(teacher ||
    student)) of logits (B, K, V) at input positions ``keep`` (K,) whose next token ``labels`` (B, T) scores."""
    from recoup.recover.losses import kd_loss

    m = mask.unsqueeze(-1).to(student_hidden[0].dtype)
    denom = m.sum() * student_hidden[0].shape[-1]
    mse = sum(((s - t) ** 2 * m).sum() / denom for s, t in zip(student_hidden, teacher_hidden)) / len(student_hidden)
    loss = alpha * mse
    if kl_weight > 0 and student_logits is not None and teacher_logits is not None:
        loss = loss + kl_weight * kd_loss(student_logits, teacher_logits, keep, labels, temperature)
    return loss


def make_teacher(dense: nn.Module, lora: LoraRecovery) -> nn.Module:
    """Teacher for distillation: the dense model with its (task) LoRA attached, frozen, in eval mode."""
    teacher = lora.apply(dense)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def build_cpet(
    model: nn.Module, cfg: CpetConfig, inherit: LoraRecovery | None = None, seed: int = 0
) -> tuple[CpetRecovery, nn.Module]:
    """Attach CPET's LoRA (copied from ``inherit`` or PEFT's random init) and zero-init recovery modules."""
    fresh = LoraRecovery.for_model(model, cfg.lora())
    if inherit is not None and (inherit.cfg.rank != cfg.rank or inherit.target_modules != fresh.target_modules):
        raise RecoupError(
            f"the LoRA to inherit has rank {inherit.cfg.rank} on {inherit.target_modules}; CPET needs "
            f"the same --rank ({cfg.rank}) and targets ({fresh.target_modules})"
        )
    state = inherited_state(inherit, cfg.lora()) if inherit is not None else None
    lora = LoraRecovery(cfg.lora(), fresh.target_modules, state, fresh.hidden_size)
    modules = CpetRecovery.new_modules(model, cfg, seed + 1) if cfg.recovery_modules else nn.ModuleDict()
    rec = CpetRecovery(cfg, lora, modules)
    return rec, rec.apply(model, seed=seed)


def fit_cpet(
    model: nn.Module,
    tokenizer,
    data,
    cfg: CpetConfig,
    train_cfg,
    inherit: LoraRecovery | None = None,
    teacher: nn.Module | None = None,
    batch_size: int = 8,
    objective=None,
):
    """Train CPET on a frozen compressed ``model``; returns (CpetRecovery, TrainResult, wrapped model).

    ``inherit``: the dense model's LoRA to start from (None = PEFT's random init); ``teacher``: the
    dense model + LoRA (see :func:`make_teacher`), required when ``cfg.distill``. Batches are
    :class:`~recoup.recover.task_data.Batch` (ids/mask/labels, (B, T)). The LoRA and the recovery
    modules are trained together with the shared loop; the best state by validation task loss is kept.
    ``objective`` (an :class:`~recoup.recover.losses.Objective`, default lm) is the task term.
    """
    from recoup.recover.losses import Objective, mean_loss, model_outputs
    from recoup.recover.task_data import pad_id_of
    from recoup.recover.train import train

    if cfg.distill and teacher is None:
        raise RecoupError("--distill needs a teacher: the dense model with its LoRA (give --inherit DENSE_LORA_DIR)")
    device = next(model.parameters()).device
    before = linear_digests(model)
    rec, wrapped = build_cpet(model, cfg, inherit, train_cfg.seed)
    lora, modules = rec.lora, rec.modules
    params = lora_parameters(wrapped) + list(modules.parameters())
    num_layers = len(anatomy(base_of(model)).layers)
    idx = hidden_indices(cfg, num_layers) if cfg.distill else []
    if cfg.distill and len(anatomy(base_of(teacher)).layers) != num_layers:
        raise RecoupError("the teacher and the compressed model have different numbers of layers")
    parts = {"task": 0.0, "distill": 0.0, "n": 0}
    objective = Objective("lm") if objective is None else objective

    def loss_fn(b) -> torch.Tensor:
        out, keep = model_outputs(wrapped, b, device, hidden=cfg.distill)
        task = objective.of_logits(out.logits, keep, b, device)
        if not cfg.distill:
            return task
        with torch.no_grad():
            tout, _ = model_outputs(teacher, b, device, hidden=True)
        d = distill_loss(
            [out.hidden_states[i] for i in idx],
            [tout.hidden_states[i] for i in idx],
            b.attention_mask.to(device),
            out.logits,
            tout.logits,
            keep,
            b.labels,
            cfg.distill_alpha,
            cfg.kl_weight,
            cfg.kl_temperature,
        )
        parts["task"] += task.item()
        parts["distill"] += d.item()
        parts["n"] += 1
        return task + d

    pad = pad_id_of(tokenizer)
    batches = data.batches(batch_size, pad, train_cfg.seed)
    validate = (lambda: mean_loss(wrapped, data.valid, pad, batch_size)) if data.valid else None
    result = train(params, batches, loss_fn, train_cfg, validate, tokens_in=lambda b: b.tokens, desc="cpet")
    if linear_digests(wrapped) != before:
        raise RecoupError("internal error: training changed the frozen base weights")
    lora.capture(wrapped)
    rec.meta.update(
        {
            **start_meta(inherit),
            "base_intact": True,
            "inherited_from": inherit.meta.get("source") if inherit is not None else None,
            "distill_hidden_indices": idx,
            "mean_task_loss": parts["task"] / parts["n"] if parts["n"] else None,
            "mean_distill_loss": parts["distill"] / parts["n"] if parts["n"] else None,
            "train": {
                "steps": result.steps,
                "seconds": round(result.seconds, 1),
                "best_val_loss": result.best_val_loss,
                "best_step": result.best_step,
            },
            "data": data.protocol,
        }
    )
    return rec, result, wrapped


# ---------------------------------------------------------------------------- the method (registry entry)


@dataclasses.dataclass
class CpetMethodConfig(LoraMethodConfig):
    """``recoup recover --method cpet``: the LoRA keys plus CPET's three switches. ``inherit`` names the dense
    model's LoRA (inheritance; also the teacher's adapter); ``distill`` needs it and a dense ``teacher``
    source (default: the artifact's source model)."""

    recovery_modules: bool = False  # add low-rank non-linear recovery modules beside the linears
    recovery_rank: int = 8
    recovery_targets: str = "all"
    distill: bool = False  # distil from the dense model + its LoRA (inherit) into the compressed model
    distill_alpha: float = 1.0  # weight of the hidden-state MSE
    distill_layers: str = "last"  # last (final normed hidden state) | all | comma list of decoder layers
    kl_weight: float = 0.0  # weight of the logit KL term
    kl_temperature: float = 2.0
    teacher: str | None = None  # dense model source for distillation (default: the artifact's source)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.cpet()
        check(
            not self.distill or self.inherit is not None,
            "distill needs inherit=DENSE_LORA_DIR: the teacher is the dense model + that LoRA",
        )

    def cpet(self) -> CpetConfig:
        return CpetConfig(
            rank=self.rank,
            alpha=self.alpha,
            targets=self.targets,
            recovery_modules=self.recovery_modules,
            recovery_rank=self.recovery_rank,
            recovery_targets=self.recovery_targets,
            distill=self.distill,
            distill_alpha=self.distill_alpha,
            distill_layers=self.distill_layers,
            kl_weight=self.kl_weight,
            kl_temperature=self.kl_temperature,
        )


def fit(loaded, config: CpetMethodConfig, data) -> tuple[CpetRecovery, Any]:
    """The registry's fit: CPET on a compressed ``loaded`` (its compression checked unchanged)."""
    from recoup.artifact import load_model

    inherit = config.initial(loaded)
    teacher, source = None, None
    if config.distill:
        source = config.teacher or ((loaded.manifest or {}).get("source") or {}).get("model")
        if not source:
            raise RecoupError("distill: name the dense model with teacher=SOURCE (the model has no artifact manifest)")
        dtype = next(loaded.model.parameters()).dtype
        teacher = make_teacher(load_model(source, dtype=dtype).model, inherit)
    before = compression_digest(loaded.model, loaded.manifest)
    rec, result, wrapped = fit_cpet(
        loaded.model,
        loaded.tokenizer,
        data,
        config.cpet(),
        config.train_config(),
        inherit,
        teacher,
        config.batch_size,
        config.objective_loss(loaded),
    )
    rec.meta["teacher"] = source
    record_intact(rec, loaded, wrapped, before)
    return rec, result


METHOD = RecoveryMethod(
    "cpet",
    "CPET / CA-LoRA: inheritance, recovery modules, distillation (Zhao et al. 2023)",
    CpetMethodConfig,
    fit,
    CpetRecovery.load,
)
