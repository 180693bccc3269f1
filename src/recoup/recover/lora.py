"""LoRA recovery through PEFT (Hu et al. 2021), trained on a frozen (possibly compressed) model, kept unmerged.

The adapter (:class:`recoup.recover.adapter.LoraRecovery`) adds ``B @ A`` beside each targeted linear, B
initialised at zero, A Kaiming-uniform (PEFT's init), or copied from a LoRA / EoRA to start from (``inherit``,
``init=eora``). It is never merged, so a sparse or quantized base stays exactly as it was: the base weights are
frozen, and their digests (:func:`recoup.recover.base.linear_digests`) and the artifact's compression fingerprint
are checked unchanged after training. The saved directory is a plain PEFT LoRA adapter.
"""

from __future__ import annotations

from torch import nn

from recoup.errors import RecoupError
from recoup.recover.adapter import (
    LoraConfig,
    LoraMethodConfig,
    LoraRecovery,
    inherited_state,
    lora_parameters,
    start_meta,
)
from recoup.recover.base import RecoveryMethod, compression_digest, linear_digests, record_intact
from recoup.recover.train import TrainResult


def fit_lora(
    model: nn.Module,
    tokenizer,
    data,
    cfg: LoraConfig,
    train_cfg,
    batch_size: int = 8,
    init: LoraRecovery | None = None,
    loss=None,
):
    """Train a LoRA on a frozen (possibly compressed) model; returns (LoraRecovery, TrainResult, wrapped).

    ``data`` is a :class:`~recoup.recover.task_data.TuningData`; ``init`` (a LoRA of the same rank and
    targets, e.g. one trained on the dense model) replaces PEFT's random init; ``loss`` (default
    :func:`~recoup.recover.losses.prefixed_loss`) is called as ``loss(model, batch, device)``, e.g. an
    :class:`~recoup.recover.losses.Objective`. The base weights are
    checked bit-identical after training (RecoupError otherwise). ``model`` is wrapped in place.
    """
    from recoup.recover.losses import mean_loss, prefixed_loss
    from recoup.recover.task_data import pad_id_of
    from recoup.recover.train import train

    device = next(model.parameters()).device
    before = linear_digests(model)
    fresh = LoraRecovery.for_model(model, cfg)
    rec = (
        fresh if init is None else LoraRecovery(cfg, init.target_modules, inherited_state(init, cfg), init.hidden_size)
    )
    if init is not None and (init.cfg.rank != cfg.rank or init.target_modules != fresh.target_modules):
        raise RecoupError(
            f"the LoRA to inherit has rank {init.cfg.rank} on {init.target_modules}; "
            f"train with the same --rank and targets"
        )
    wrapped = rec.apply(model, seed=train_cfg.seed)
    params = lora_parameters(wrapped)
    pad = pad_id_of(tokenizer)
    batches = data.batches(batch_size, pad, train_cfg.seed)
    validate = (lambda: mean_loss(wrapped, data.valid, pad, batch_size)) if data.valid else None
    loss = prefixed_loss if loss is None else loss
    result = train(
        params,
        batches,
        lambda b: loss(wrapped, b, device),
        train_cfg,
        validate,
        tokens_in=lambda b: b.tokens,
        desc="lora",
    )
    if linear_digests(wrapped) != before:
        raise RecoupError("internal error: training changed the frozen base weights")
    rec.capture(wrapped)
    rec.meta.update(
        {
            **start_meta(init),
            "base_intact": True,
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


def fit(loaded, config: LoraMethodConfig, data) -> tuple[LoraRecovery, TrainResult]:
    """The registry's fit: LoRA on ``loaded`` (kept unmerged; its compression checked unchanged)."""
    init = config.initial(loaded)
    before = compression_digest(loaded.model, loaded.manifest)
    rec, result, wrapped = fit_lora(
        loaded.model,
        loaded.tokenizer,
        data,
        config.lora(),
        config.train_config(),
        config.batch_size,
        init=init,
        loss=config.objective_loss(loaded),
    )
    record_intact(rec, loaded, wrapped, before)
    return rec, result


METHOD = RecoveryMethod(
    "lora",
    "LoRA through PEFT, kept unmerged (Hu et al. 2021)",
    LoraMethodConfig,
    fit,
    LoraRecovery.load,
    peft_type="LORA",
)
