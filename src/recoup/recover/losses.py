"""The one language-model loss every recovery trains and validates with, and the training objectives.

- :func:`prefixed_loss` / :func:`kept_loss`: next-token cross-entropy on a batch's scored tokens only
  (logits computed only where a next token is scored), behind an optional input-embedding prefix;
  :func:`lm_loss` the same on plain windows; :func:`mean_loss` the token-weighted mean for validation;
- :class:`Objective`: ``lm`` | ``kd`` (distil the teacher's next-token distribution) | ``lm+kd``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F

from recoup.errors import RecoupError
from recoup.recover.task_data import Batch, Sequence, collate
from recoup.registry import unknown_name_message

def lm_loss(model, x: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token NLL of windows ``x`` (B, T), every token after the first scored, behind an optional
    input-embedding prefix (P, H) or (B, P, H) that is never scored (:func:`prefixed_loss` on a window batch)."""
    b = collate([Sequence(ids=row.tolist()) for row in x.cpu()], 0)
    return prefixed_loss(model, b, x.device, prefix)


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """Input positions (K,) whose next token is scored in at least one row of ``labels`` (B, T)."""
    return (labels[:, 1:] != -100).any(0).nonzero().flatten()


def model_outputs(model, batch: "Batch", device, hidden: bool = False, prefix: torch.Tensor | None = None):
    """One forward of ``batch`` that computes logits only where a next token is scored.

    Returns (outputs, keep): ``outputs.logits`` is (B, K, V) at the input positions ``keep`` (K,), so the
    vocabulary projection (the largest activation of a small model) covers a handful of positions
    instead of all T. ``prefix``: input embeddings (P, H) or (B, P, H) put in front (a soft prompt);
    its positions are never scored and ``keep`` stays in the batch's own positions.
    ``outputs.hidden_states`` (when ``hidden``) are full, (B, P + T, H).
    """
    from recoup.model.forward import build_inputs, keeps_logits

    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    keep = scored_positions(batch.labels).to(device)
    kwargs = build_inputs(model, ids, mask, prefix)
    at = keep + (kwargs["inputs_embeds"].shape[1] - ids.shape[1])
    if keeps_logits(model):
        return model(**kwargs, use_cache=False, logits_to_keep=at, output_hidden_states=hidden), keep
    out = model(**kwargs, use_cache=False, output_hidden_states=hidden)
    out.logits = out.logits[:, at]
    return out, keep


def kept_loss(logits: torch.Tensor, keep: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (B, K, V) at positions ``keep`` against the next tokens ``labels[:, keep + 1]``."""
    target = labels.to(logits.device)[:, keep + 1]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                           reduction=reduction)


def prefixed_loss(model, batch: Batch, device, prefix: torch.Tensor | None = None,
                  reduction: str = "mean") -> torch.Tensor:
    """Loss of ``batch`` on its scored tokens, optionally behind an input-embedding ``prefix`` (P, H) or (B, P, H)."""
    out, keep = model_outputs(model, batch, device, prefix=prefix)
    return kept_loss(out.logits, keep, batch.labels, reduction=reduction)


def mean_loss(model, seqs: list[Sequence], pad_id: int, batch_size: int = 8,
              prefix_fn: Callable[[Batch], torch.Tensor | None] | None = None) -> float:
    """Token-weighted mean loss over ``seqs`` in order (for validation); ``prefix_fn(batch)`` may give a prefix."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(seqs), batch_size):
            b = collate(seqs[start:start + batch_size], pad_id)
            n = int((b.labels[:, 1:] != -100).sum())
            if n:
                prefix = prefix_fn(b) if prefix_fn is not None else None
                total += prefixed_loss(model, b, device, prefix, reduction="sum").item()
                count += n
    return total / count if count else math.nan


# ---------------------------------------------------------------- training objectives (lm | kd | lm+kd)

OBJECTIVES = ("lm", "kd", "lm+kd")


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor, labels: torch.Tensor,
            temperature: float = 2.0) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015): T^2 x KL(teacher || student) of the next-token
    distributions at temperature T, averaged over the scored positions.

    student, teacher: logits (B, K, V) at the input positions ``keep`` (K,); labels (B, T) with -100 where a
    token is not scored (a position counts when its next token ``labels[:, keep + 1]`` is scored).
    """
    scored = labels.to(student.device)[:, keep + 1] != -100
    s = F.log_softmax(student[scored].float() / temperature, -1)
    t = F.log_softmax(teacher[scored].float().to(student.device) / temperature, -1)
    return temperature ** 2 * F.kl_div(s, t, log_target=True, reduction="batchmean")


@dataclasses.dataclass
class Objective:
    """The one training loss of every trained recovery: ``lm`` (next-token cross-entropy on the scored
    tokens), ``kd`` (:func:`kd_loss` against ``teacher``), or ``lm+kd`` (lm + ``weight`` x kd).

    The teacher (the dense model) sees the batch without any prefix; its logits are computed once per
    batch under ``no_grad``. Call it like :func:`prefixed_loss`: ``objective(model, batch, device, prefix)``;
    :meth:`of_logits` scores logits a method already computed (e.g. CPET's forward with hidden states).
    """

    kind: str = "lm"
    teacher: torch.nn.Module | None = None
    temperature: float = 2.0
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in OBJECTIVES:
            raise RecoupError(unknown_name_message("objective", self.kind, OBJECTIVES))
        if self.kind != "lm" and self.teacher is None:
            raise RecoupError(f"objective {self.kind} needs a teacher (the dense model)")

    def of_logits(self, logits: torch.Tensor, keep: torch.Tensor, batch: Batch, device) -> torch.Tensor:
        """The loss of student logits (B, K, V) at ``keep`` (as :func:`model_outputs` returns them)."""
        if self.kind == "lm":
            return kept_loss(logits, keep, batch.labels)
        with torch.no_grad():
            tout, _ = model_outputs(self.teacher, batch, device)
        kd = kd_loss(logits, tout.logits, keep, batch.labels, self.temperature)
        return kd if self.kind == "kd" else kept_loss(logits, keep, batch.labels) + self.weight * kd

    def __call__(self, model, batch: Batch, device, prefix: torch.Tensor | None = None) -> torch.Tensor:
        out, keep = model_outputs(model, batch, device, prefix=prefix)
        return self.of_logits(out.logits, keep, batch, device)
