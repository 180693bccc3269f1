"""The one language-model loss every recovery trains and validates with, and the training objectives.

- :func:`prefixed_loss` / :func:`kept_loss`: next-token cross-entropy on a batch's scored tokens only
  (logits computed only where a next token is scored), behind an optional input-embedding prefix;
  :func:`lm_loss` the same on plain windows; :func:`mean_loss` the token-weighted mean for validation;
- :class:`Objective`: ``lm`` | ``kd`` (distil the teacher's next-token distribution) | ``squarehead``
  (:func:`squarehead_loss`, match the teacher's decoder-layer outputs) or a ``+`` sum of them (``lm+kd``,
  ``kd+squarehead`` ...).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Iterator

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
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction=reduction
    )


def prefixed_loss(
    model, batch: Batch, device, prefix: torch.Tensor | None = None, reduction: str = "mean"
) -> torch.Tensor:
    """Loss of ``batch`` on its scored tokens, optionally behind an input-embedding ``prefix`` (P, H) or (B, P, H)."""
    out, keep = model_outputs(model, batch, device, prefix=prefix)
    return kept_loss(out.logits, keep, batch.labels, reduction=reduction)


def mean_loss(
    model,
    seqs: list[Sequence],
    pad_id: int,
    batch_size: int = 8,
    prefix_fn: Callable[[Batch], torch.Tensor | None] | None = None,
) -> float:
    """Token-weighted mean loss over ``seqs`` in order (for validation); ``prefix_fn(batch)`` may give a prefix."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(seqs), batch_size):
            b = collate(seqs[start : start + batch_size], pad_id)
            n = int((b.labels[:, 1:] != -100).sum())
            if n:
                prefix = prefix_fn(b) if prefix_fn is not None else None
                total += prefixed_loss(model, b, device, prefix, reduction="sum").item()
                count += n
    return total / count if count else math.nan


# ---------------------------------------------------------------- training objectives (lm | kd | squarehead, summed)

TERMS = ("lm", "kd", "squarehead")
OBJECTIVES = ("lm", "kd", "lm+kd", "squarehead", "kd+squarehead", "lm+squarehead", "lm+kd+squarehead")


def objective_terms(kind: str) -> tuple[str, ...]:
    """The terms of an objective name (``kd+squarehead`` -> ("kd", "squarehead")), in :data:`TERMS` order, any
    order and no repeats accepted; one clear line for anything else."""
    parts = [p.strip() for p in str(kind).split("+")]
    if not parts or any(p not in TERMS for p in parts) or len(set(parts)) != len(parts):
        raise RecoupError(unknown_name_message("objective", str(kind), OBJECTIVES))
    return tuple(t for t in TERMS if t in parts)


def kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor, labels: torch.Tensor, temperature: float = 2.0
) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015): T^2 x KL(teacher || student) of the next-token
    distributions at temperature T, averaged over the scored positions.

    student, teacher: logits (B, K, V) at the input positions ``keep`` (K,); labels (B, T) with -100 where a
    token is not scored (a position counts when its next token ``labels[:, keep + 1]`` is scored).
    """
    scored = labels.to(student.device)[:, keep + 1] != -100
    s = F.log_softmax(student[scored].float() / temperature, -1)
    t = F.log_softmax(teacher[scored].float().to(student.device) / temperature, -1)
    return temperature**2 * F.kl_div(s, t, log_target=True, reduction="batchmean")


def squarehead_loss(
    student: list[torch.Tensor], teacher: list[torch.Tensor], mask: torch.Tensor | None = None
) -> torch.Tensor:
    """SquareHead distillation (Kurtic et al. 2023, "Sparse Fine-tuning for Inference Acceleration of Large
    Language Models"): the sum over decoder layers l of MSE(h_s^l, h_t^l) / MSE(h_t^l, 0), i.e.
    ``||h_s^l - h_t^l||^2 / ||h_t^l||^2`` over the batch's real tokens: each layer's error relative to the
    teacher's own scale, so layers of large activations do not dominate.

    student, teacher: one (B, T, H) output per decoder layer, in order; mask (B, T): 1 for real tokens (padding
    is not counted; None: every position). 0 exactly when the student's layer outputs equal the teacher's.
    """
    if len(student) != len(teacher) or not student:
        raise RecoupError(
            f"squarehead needs one output per decoder layer of student and teacher; got "
            f"{len(student)} and {len(teacher)} (is the teacher the same architecture?)"
        )
    device = student[0].device
    m = None if mask is None else mask.to(device=device, dtype=torch.float32).unsqueeze(-1)
    total = torch.zeros((), device=device)
    for s, t in zip(student, teacher):
        s, t = s.float(), t.float().to(device)
        err, ref = (s - t).pow(2), t.pow(2)
        if m is not None:
            err, ref = err * m, ref * m
        total = total + err.sum() / ref.sum().clamp_min(torch.finfo(torch.float32).tiny)
    return total


@contextlib.contextmanager
def layer_outputs(model) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, every forward of ``model`` (a PeftModel's base included) records each decoder layer's
    output hidden states (B, T, H) in the yielded dict, keyed by layer index (a later forward overwrites)."""
    from recoup.model.anatomy import anatomy

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    seen: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(anatomy(base).layers):

        def hook(module, args, output, i=i):
            seen[i] = output[0] if isinstance(output, (tuple, list)) else output

        hooks.append(layer.register_forward_hook(hook))
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


@dataclasses.dataclass
class Objective:
    """The one training loss of every trained recovery: a sum of the terms of ``kind``:

    - ``lm``: next-token cross-entropy on the scored tokens;
    - ``kd``: :func:`kd_loss` against ``teacher``'s logits, at ``temperature``;
    - ``squarehead``: :func:`squarehead_loss` of the student's decoder-layer outputs against the teacher's.

    Beside another term, kd is weighted by ``weight`` and squarehead by ``squarehead_weight`` (lm by 1); a lone
    term is the loss as is. The teacher (the dense model) sees the batch without any prefix; its logits and
    layer outputs are computed once per batch under ``no_grad``; the student's layer outputs behind a prefix
    are compared on the batch's own positions (the prefix's dropped). Call it like :func:`prefixed_loss`:
    ``objective(model, batch, device, prefix)``; :meth:`of_logits` scores logits a method already computed
    (e.g. CPET's forward), which squarehead cannot (it needs the layer outputs of that forward).
    """

    kind: str = "lm"
    teacher: torch.nn.Module | None = None
    temperature: float = 2.0
    weight: float = 1.0
    squarehead_weight: float = 1.0

    def __post_init__(self) -> None:
        self.terms = objective_terms(self.kind)
        if self.terms != ("lm",) and self.teacher is None:
            raise RecoupError(f"objective {self.kind} needs a teacher (the dense model)")

    def _weights(self) -> dict[str, float]:
        if len(self.terms) == 1:
            return {self.terms[0]: 1.0}
        return {"lm": 1.0, "kd": self.weight, "squarehead": self.squarehead_weight}

    def of_logits(
        self, logits: torch.Tensor, keep: torch.Tensor, batch: Batch, device, hidden: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The loss of student logits (B, K, V) at ``keep`` (as :func:`model_outputs` returns them); ``hidden``:
        the student's decoder-layer outputs of the same forward (needed by squarehead), each (B, P + T, H)."""
        w = self._weights()
        loss = kept_loss(logits, keep, batch.labels) if "lm" in self.terms else None
        if self.terms == ("lm",):
            return loss
        if "squarehead" in self.terms and hidden is None:
            raise RecoupError(
                "objective squarehead needs the layer outputs of the student's forward, which this "
                "method does not expose; use lm, kd or lm+kd with it"
            )
        with torch.no_grad(), layer_outputs(self.teacher) as seen:
            tout, _ = model_outputs(self.teacher, batch, device)
        terms = []
        if "kd" in self.terms:
            terms.append(w["kd"] * kd_loss(logits, tout.logits, keep, batch.labels, self.temperature))
        if "squarehead" in self.terms:
            t = batch.input_ids.shape[1]
            teacher = [seen[i] for i in sorted(seen)]
            terms.append(w["squarehead"] * squarehead_loss([h[:, -t:] for h in hidden], teacher, batch.attention_mask))
        for term in terms:
            loss = term if loss is None else loss + term
        return loss

    def __call__(self, model, batch: Batch, device, prefix: torch.Tensor | None = None) -> torch.Tensor:
        if "squarehead" not in self.terms:
            out, keep = model_outputs(model, batch, device, prefix=prefix)
            return self.of_logits(out.logits, keep, batch, device)
        with layer_outputs(model) as seen:
            out, keep = model_outputs(model, batch, device, prefix=prefix)
        return self.of_logits(out.logits, keep, batch, device, [seen[i] for i in sorted(seen)])
