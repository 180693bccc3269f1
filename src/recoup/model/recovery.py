"""The recovery contract shared by evaluation, training and the results store.

A recovery is fitted on one model and can be saved, loaded and attached to any compatible model
(same hidden size). It acts in one or both of two ways:

- ``prefix(model, input_ids, attention_mask)``: an input-embedding prefix, (P, H) or (B, P, H),
  that the shared forward (:mod:`recoup.model.forward`) prepends; prompts and IDP work this way
  (IDP picks a prompt per example, so its prefix is per example);
- ``apply(model)``: returns the model with adapter modules attached (LoRA, CPET); it must never
  densify a sparse model or un-quantize a quantized one.

An evaluation calls ``apply`` once per loaded model (``apply`` wraps the model in place, so a second call would
stack a second adapter) and ``prefix`` per batch.
"""

from __future__ import annotations

import abc
from pathlib import Path

import torch
from torch import nn

# The files a saved recovery directory holds (one place for their names).
RECOVERY_RECORD = "recoup_recovery.json"  # {"method": ..., ...}: names the method of a non-PEFT layout
TRAIN_RECORD = "recoup_train.json"  # how it was trained (history, protocol)
RUN_RECORD = "recoup_run.json"  # the command-level summary `recoup recover` writes
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


class Recovery(abc.ABC):
    """Base class of every recovery method."""

    method: str = "none"

    def apply(self, model: nn.Module) -> nn.Module:
        """Attach adapter modules (default: none); returns the model to run."""
        return model

    def prefix(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """Input-embedding prefix for this batch (default: none)."""
        return None

    @abc.abstractmethod
    def num_parameters(self) -> int:
        """Trainable parameters the recovery adds."""

    @abc.abstractmethod
    def save(self, path: str | Path) -> None:
        """Write the recovery to a directory (PEFT layout where a PEFT method fits)."""

    def describe(self) -> dict:
        return {"method": self.method, "parameters": self.num_parameters()}
