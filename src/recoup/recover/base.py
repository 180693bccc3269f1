"""What a recovery method is, for the registry (:mod:`recoup.recover.methods`), and the helpers every method
shares: the frozen base under a wrapper (:func:`base_of`), proof that training left it bit-identical
(:func:`linear_digests`, :func:`compression_digest`, :func:`record_intact`) and the base path a saved PEFT
directory names (:func:`peft_base_path`). Method modules import these from here, never from one another.

A method is ``{name, config class, fit(loaded, config, data) -> (Recovery, TrainResult | None), load(dir)}``:

- ``config``: its typed config (:class:`recoup.config.Config`); a trained method derives from
  :class:`recoup.recover.train.FitConfig`, so it shares the data keys (``data``/``task`` ...) and the loop's;
- ``fit``: learns the recovery on ``loaded`` (the model stays bit-identical). ``data`` is the
  :class:`recoup.recover.task_data.TuningData` the stage built from the config's data keys (None for a
  method whose config is not a FitConfig, e.g. a hard prompt);
- ``load``: reads a saved directory back; ``peft_type`` names the PEFT layout it saves (``LORA``,
  ``PROMPT_TUNING``) when it saves one, so a plain PEFT directory loads too.

The recovery contract itself (``prefix`` / ``apply`` / ``save``) is :class:`recoup.model.recovery.Recovery`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from recoup.errors import RecoupError
from recoup.model.anatomy import anatomy
from recoup.model.recovery import Recovery


@dataclasses.dataclass(frozen=True)
class RecoveryMethod:
    name: str
    help: str
    config: type
    fit: Callable[[Any, Any, Any], tuple[Recovery, Any]]
    load: Callable[[Path], Recovery]
    peft_type: str | None = None
    # a fit that reads the artifact (and its dense source) one decoder layer at a time: (loaded skeleton, its lazy
    # weights, config) -> (recovery, result); None: the method needs the whole model in memory
    fit_lazy: Callable[[Any, Any, Any], tuple[Recovery, Any]] | None = None

    @property
    def trains(self) -> bool:
        """Whether it learns from data (its config carries the FitConfig keys)."""
        from recoup.recover.train import FitConfig

        return issubclass(self.config, FitConfig)


def base_of(model: nn.Module) -> nn.Module:
    """The underlying transformers model of a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def weight_of(module: nn.Module) -> torch.Tensor:
    """A linear's own weight: the frozen base layer's under a LoRA wrapper."""
    return module.base_layer.weight if hasattr(module, "base_layer") else module.weight


def linear_digests(model: nn.Module) -> dict[str, str]:
    """sha256 of every targeted base weight (the frozen one under a LoRA wrapper), keyed by layer.linear.

    Equal digests before and after training prove that masks and quantized values are unchanged.
    """
    ana = anatomy(base_of(model))
    out = {}
    for i, layer in enumerate(ana.layers):
        for name in ana.linear_names():
            mod = layer
            for part in name.split("."):
                mod = getattr(mod, part)
            w = weight_of(mod).detach().to("cpu").contiguous()
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


def compression_digest(model: nn.Module, manifest: dict | None) -> dict | None:
    """The artifact's compression fingerprint (masks + quantized codes) of ``model``; None for a plain model."""
    if not manifest:
        return None
    from recoup.artifact.fingerprint import compression_fingerprint

    return compression_fingerprint(base_of(model), manifest)


def record_intact(rec: Recovery, loaded, wrapped: nn.Module, before: dict | None) -> None:
    """Prove the artifact's masks and codes are unchanged after training (RecoupError otherwise) and record
    it, with the base the recovery was learned on, in ``rec.meta``."""
    after = None
    if before is not None:
        after = compression_digest(wrapped, loaded.manifest)
        if after["digest"] != before["digest"]:
            raise RecoupError("internal error: training changed the artifact's masks or quantized values")
    record_base(rec, loaded, after)


def record_base(rec: Recovery, loaded, fingerprint: dict | None) -> None:
    """Record in ``rec.meta`` the base the recovery was learned on and its (unchanged) compression
    ``fingerprint`` (:func:`recoup.artifact.fingerprint.compression_fingerprint`; None for a plain model)."""
    if fingerprint is not None:
        rec.meta["compression_fingerprint"] = {
            "digest": fingerprint["digest"],
            "unchanged": True,
            "sparsity": fingerprint["sparsity"],
            "all_on_grid": fingerprint["all_on_grid"],
        }
    rec.meta["source"] = loaded.source
