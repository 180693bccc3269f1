"""One prefill over a pool of prompts with a per-layer mask switch (IDP's one-prefill mode).

Hoang et al. 2023 ("Do Compressed LLMs Forget Knowledge?"), Inference-time Dynamic Prompting: a pool
of ``m`` prompts of ``n`` tokens, one chosen per input from the attention the input pays it. Here the
choice costs no extra pass over the input. The caller hands the whole pool as the usual input-embedding
prefix (B, P, H), ``P = m*n``, every row the same pool, to the model's next forward (armed with
:meth:`PoolPrefill.arm`); the hooks turn that forward into:

- the pool's key/values: one pass over the ``m`` prompts as a batch of ``m`` sequences, so every prompt
  has the positions ``0..n-1`` and attends only to itself (its key/values in every layer are those of
  the prompt alone), laid out as a (B, heads, P, d) cache in front of the input. Without gradients it is
  computed once per model and pool state (``pool_key``) and reused; with gradients once per forward;
- the input's prefill after that cache, at the positions ``n, n+1, ...`` exactly as behind a single
  prompt (left padding as in :func:`recoup.model.forward.build_inputs`). The first ``K`` decoder layers
  run eager attention and their input->prompt attention is reduced to a score per prompt, (B, m):
  summed over layers and heads, each prompt's first position (where it starts, an attention sink) left
  out unless ``n == 1``, mean over the prompt's other positions, summed over the scored input tokens; the
  caller's ``choose`` turns the scores into a choice (B,);
- from decoder layer K+1 on, an input token sees only its chosen prompt's columns (per example), and the
  forward's 2D attention mask (the caller's tensor) is updated **in place**: the unchosen prompts'
  columns become 0. A caller that continues from the returned KV cache with that mask (the Scorer's
  continuations and decoding) never attends to the unchosen prompts and numbers positions as behind
  one prompt (a row's count of attended past positions).

The forward's outputs cover the input's positions only (a ``logits_to_keep`` tensor of positions over
``[prefix; input]`` is shifted; prefix positions have no logits), as callers that drop the prefix's
positions from the end expect. Layers K+1..L compute exactly what they compute behind the chosen prompt
alone, given the input's hidden states entering layer K+1 (which did see the whole pool in layers
1..K); each decoder layer runs once over the input. The mask of each layer is the model's own (padding,
causal, sliding window: transformers builds it, per layer type) intersected with this structure, so
nothing here is per architecture; a sliding window counts cache indices, which include the other
prompts' columns (exact while an input is shorter than the window minus ``(m-1)*n``). Eager and sdpa
attention only (4D masks). The hooks are attached once per model (:func:`pool_prefill`) and stay inert
until armed; the armed forward must take ``inputs_embeds`` and a 2D mask, with no earlier cache.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

import torch
from torch import nn
from transformers import DynamicCache

from recoup.errors import RecoupError
from recoup.model.anatomy import anatomy
from recoup.model.forward import CACHE_ARG, output_cache

ATTRIBUTE = "_recoup_pool_prefill"


@dataclasses.dataclass
class _Job:
    prompts: int
    tokens: int
    input_mask: torch.Tensor  # (B, T) real input tokens
    score_mask: torch.Tensor  # (B, T) input tokens whose attention scores the prompts
    select_after: int  # K: layers 0..K-1 score, layers >= K see the chosen prompt only
    choose: Callable[[torch.Tensor], torch.Tensor]  # raw scores (B, m) -> choice (B,)
    scores: torch.Tensor | None = None
    choice: torch.Tensor | None = None
    mask2d: torch.Tensor | None = None
    previous: str | None = None
    layers_run: int = 0
    structure: torch.Tensor | None = None  # (B or 1, 1, T or 1, P+T or 1) bool, None outside the prefill's layers
    pool_key: object = None
    block: torch.Tensor | None = None  # (P,) the prompt each prefix position belongs to
    masks: dict = dataclasses.field(default_factory=dict)
    layer_scores: list = dataclasses.field(default_factory=list)  # per scored layer: (B, m), before the token mean

    @property
    def width(self) -> int:
        return self.prompts * self.tokens


class PoolPrefill:
    """Hooks on one model, its decoder layers and their attention modules (located by the anatomy map)."""

    def __init__(self, model: nn.Module) -> None:
        an = anatomy(model)
        self.model = model
        self.base = model.get_submodule(an.spec.layers.rsplit(".", 1)[0])
        self.layers = list(an.layers)
        attn_path = an.spec.attention[0].rsplit(".", 1)[0]
        self.attention = [layer.get_submodule(attn_path) for layer in self.layers]
        self.config = getattr(self.attention[0], "config", None) or model.config
        self.job: _Job | None = None
        self.last: _Job | None = None
        self._kv: tuple | None = None  # (key, per-layer (keys, values) of the pool, (m, heads, n, d))
        self._mask_index = [
            list(inspect.signature(layer.forward).parameters).index("attention_mask") for layer in self.layers
        ]
        self.handles = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True),
            model.register_forward_hook(self._post, always_call=True),
        ]
        for i, layer in enumerate(self.layers):
            self.handles.append(
                layer.register_forward_pre_hook(
                    lambda mod, args, kwargs, i=i: self._layer_pre(i, args, kwargs), with_kwargs=True
                )
            )
            self.handles.append(
                self.attention[i].register_forward_hook(lambda mod, args, out, i=i: self._attention_out(i, out))
            )

    def arm(
        self,
        prompts: int,
        tokens: int,
        input_mask: torch.Tensor,
        select_after: int,
        choose: Callable[[torch.Tensor], torch.Tensor],
        score_mask: torch.Tensor | None = None,
        pool_key: object = None,
    ) -> None:
        """Make the next forward the pooled prefill of inputs with mask ``input_mask`` (B, T).

        ``select_after`` K in 1..L (0 or more than L: after the last layer, the choice then only masks the
        cache for what follows); ``score_mask`` (B, T): the tokens whose attention scores (default: all real);
        ``pool_key``: when not None, the pool's key/values are reused while the key is the same (inference).
        """
        k = len(self.layers) if select_after <= 0 else min(select_after, len(self.layers))
        mask = input_mask.long()
        self.job = _Job(
            prompts,
            tokens,
            mask,
            (mask if score_mask is None else score_mask.long() * mask).float(),
            k,
            choose,
            pool_key=pool_key,
        )

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def _pool_cache(self, job: _Job, prefix: torch.Tensor) -> DynamicCache:
        """The pool's key/values, each prompt run alone at the positions 0..n-1, laid out as (B, heads, m*n, d)."""
        m, n, b = job.prompts, job.tokens, prefix.shape[0]
        if job.pool_key is not None and self._kv is not None and self._kv[0] == job.pool_key:
            kv = self._kv[1]
        else:
            job.structure = None  # the layer hooks stay out of this forward
            out = self.base(inputs_embeds=prefix[0].reshape(m, n, -1), use_cache=True)
            kv = [(layer.keys, layer.values) for layer in output_cache(out).layers]
            if job.pool_key is not None:
                self._kv = (job.pool_key, kv)
        cache = DynamicCache(config=self.model.config)
        for i, (keys, values) in enumerate(kv):
            cache.update(
                *(
                    x.transpose(0, 1).reshape(1, x.shape[1], m * n, x.shape[3]).expand(b, -1, -1, -1)
                    for x in (keys, values)
                ),
                i,
            )
        return cache

    # ----------------------------------------------------------------- hooks
    def _pre(self, _mod, args, kwargs):
        job = self.job
        if job is None:
            return None
        b, t = job.input_mask.shape
        embeds, mask = kwargs.get("inputs_embeds"), kwargs.get("attention_mask")
        cache = kwargs.get("cache") if kwargs.get("cache") is not None else kwargs.get("past_key_values")
        if (
            args
            or embeds is None
            or tuple(embeds.shape[:2]) != (b, job.width + t)
            or mask is None
            or mask.dim() != 2
            or (cache is not None and cache.get_seq_length() > 0)
        ):
            self.job = None
            raise RecoupError(
                "an IDP pool's prefix must go to the model's next forward, the prefill of the same "
                "inputs, with its 2D attention mask and no earlier cache"
            )
        if torch.is_grad_enabled() and any(
            getattr(layer, "gradient_checkpointing", False) and layer.training for layer in self.layers
        ):
            self.job = None
            raise RecoupError(
                "IDP's one-prefill selection does not run under gradient checkpointing (the recomputed "
                "layers would miss the per-layer masks)"
            )
        impl = self.config._attn_implementation
        if impl not in ("eager", "sdpa"):
            self.job = None
            raise RecoupError(f"IDP's one-prefill selection needs eager or sdpa attention; this model uses '{impl}'")
        p, device = job.width, embeds.device
        kwargs.pop("past_key_values", None)
        kwargs.pop("cache", None)
        kwargs[CACHE_ARG] = self._pool_cache(job, embeds[:, :p])
        kwargs["inputs_embeds"] = embeds[:, p:]
        job.input_mask, job.score_mask = job.input_mask.to(device), job.score_mask.to(device)
        kwargs["position_ids"] = (job.tokens + job.input_mask.cumsum(-1) - 1).clamp(min=0)  # as behind one prompt
        keep = kwargs.get("logits_to_keep")
        if isinstance(keep, torch.Tensor):  # positions over [prefix; input]: the forward now holds the input only
            if bool((keep < p).any()):
                self.job = None
                raise RecoupError("an IDP pool's prefix positions have no logits")
            kwargs["logits_to_keep"] = keep - p
        job.mask2d, job.previous = mask, impl
        job.scores = torch.zeros(b, job.prompts, device=device)
        job.block = torch.arange(p, device=device) // job.tokens
        job.structure = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
        if job.select_after > 0:
            self.config._attn_implementation = "eager"
        return args, kwargs

    def _post(self, _mod, _args, _out):
        job, self.job = self.job, None
        if job is None or job.previous is None:
            return None
        self.config._attn_implementation = job.previous
        if job.choice is None and job.layers_run == len(self.layers):
            self._decide(job)
        self.last = job
        return None

    def _decide(self, job: _Job) -> None:
        self.config._attn_implementation = job.previous
        raw = job.scores / job.score_mask.sum(-1, keepdim=True).clamp(min=1)
        job.scores = raw
        job.choice = job.choose(raw).to(job.block.device).long()
        keep = job.block[None, :] == job.choice[:, None]  # (B, P) the chosen prompt's columns
        job.mask2d[:, : job.width] = keep.to(job.mask2d.dtype)
        t = job.input_mask.shape[1]
        structure = torch.ones(len(keep), 1, t, job.width + t, dtype=torch.bool, device=keep.device)
        structure[:, 0, :, : job.width] = keep[:, None, :]
        job.structure = structure
        job.masks = {}

    def _layer_pre(self, i: int, args, kwargs):
        job = self.job
        if job is None or job.structure is None:
            return None
        job.layers_run += 1
        if i == job.select_after:
            self._decide(job)
        hidden = args[0] if args else kwargs["hidden_states"]
        pos = self._mask_index[i]
        positional = "attention_mask" not in kwargs and len(args) > pos
        given = args[pos] if positional else kwargs.get("attention_mask")
        eager = self.config._attn_implementation == "eager"
        key = (id(given), eager)
        if key not in job.masks:
            job.masks[key] = self._mask(job, given, hidden.dtype, eager)
        if positional:
            args = (*args[:pos], job.masks[key], *args[pos + 1 :])
        else:
            kwargs["attention_mask"] = job.masks[key]
        return args, kwargs

    def _mask(self, job: _Job, given: torch.Tensor | None, dtype: torch.dtype, eager: bool) -> torch.Tensor:
        """The layer's own mask (B|1, 1, T, P+T) intersected with the pool structure, in the layer's format."""
        t, p = job.input_mask.shape[1], job.width
        if given is None:  # the model skipped its mask: plain causal after the cached prefix, no padding
            allowed = torch.ones(t, p + t, dtype=torch.bool, device=job.structure.device).tril(p)[None, None]
        elif given.dtype == torch.bool:
            allowed = given
        else:
            allowed = given > torch.finfo(given.dtype).min / 2
        if allowed.shape[-2:] != (t, p + t):
            raise RecoupError(
                f"IDP's one-prefill mask: a layer's attention mask is {tuple(allowed.shape)}, "
                f"expected (..., {t}, {p + t})"
            )
        allowed = allowed & job.structure
        if not eager:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )

    def _attention_out(self, i: int, out) -> None:
        job = self.job
        if job is None or job.structure is None or job.choice is not None or i >= job.select_after:
            return
        weights = out[1] if isinstance(out, tuple) and len(out) > 1 else None
        if weights is None:
            raise RecoupError("IDP needs attention weights, and this model's attention did not return them")
        p, n = job.width, job.tokens
        w = weights.detach()[..., :p].float().sum(1)  # (B, T, P): heads summed
        per_pos = (w * job.score_mask[..., None]).sum(1).view(-1, job.prompts, n)  # (B, m, n)
        if n > 1:
            per_pos = per_pos[..., 1:]  # each prompt's first position left out (its attention sink)
        job.layer_scores.append(per_pos.mean(-1))
        job.scores = job.scores + job.layer_scores[-1]


def pool_prefill(model: nn.Module) -> PoolPrefill:
    """The model's :class:`PoolPrefill` hooks, attached on first use (inert until armed)."""
    found = model.__dict__.get(ATTRIBUTE)
    if found is None:
        found = PoolPrefill(model)
        model.__dict__[ATTRIBUTE] = found
    return found
