"""IDP, Inference-time Dynamic Prompting: a pool of soft prompts, one chosen per input.

Hoang et al. 2023, "Do Compressed LLMs Forget Knowledge? An Experimental Study with Practical
Implications". A pool of ``m`` prompts of ``n`` tokens, (m, n, H); the prompt whose positions draw the
most attention from the input's tokens is chosen per input. Two modes (``selection``, saved with the pool):

- ``one-prefill`` (the default): the input is prefilled **once**, after the pool's key/values
  (:mod:`recoup.model.prompt_pool`): every prompt computed alone at the positions ``0..n-1`` (once per
  model and pool state at inference), the input at ``n, n+1, ...`` as behind one prompt. The first
  ``K = select_layers`` decoder layers score the prompts; from layer K+1 on, and in every later decoding
  step (the forward's 2D mask is updated in place), an input token sees only its chosen prompt. What is
  equal: given the input's hidden states entering layer K+1, layers K+1..L compute exactly what they
  compute behind the chosen prompt alone, and the chosen prompt's cached keys/values are those of the
  prompt alone (tests/test_idp_prefill.py); the input's first K layers did see the whole pool. Each
  decoder layer runs once over the input. ``prefix`` returns the whole pool (B, m*n, H) and arms the
  model's next forward, which makes the choice (recorded in ``choices``) and returns the input's
  positions only; ``apply`` attaches the hooks (inert until armed). Eager or sdpa attention.
  ``select_layers=0`` scores all layers (the choice then only masks the cache for what follows);
- ``two-pass`` (pools saved before the modes existed load in it and behave as before): a selection
  prefill of the input after the pool's cached key/values (the whole pool at consecutive positions,
  prompts attending to each other), stopped after K layers (0: all), then the input is run again behind
  the chosen prompt only, (B, n, H): about K/L of an extra prefill.

Choices the paper leaves open, made here:

- the first pool position is left out of the scores: it is the attention sink (the first position
  draws attention whatever it holds), which would otherwise make prompt 0 win every time; in one-prefill
  mode every prompt starts at position 0 alone, so each prompt's first position is left out;
- scores are *standardised per prompt* before the argmax: ``(score - mean) / std`` with each
  prompt's mean and std of scores on the training data (running estimates during training, saved
  with the pool). Raw attention favours positions near the input (recency), so raw scores let the prompt
  nearest the input win; standardised, a prompt wins when it draws *more attention than it usually does*.
  The statistics come from the training text, so on inputs far from it (short task questions after corpus
  windows) one prompt can still win most choices. ``IDPPool(standardize=False)`` gives the raw argmax;
- training is *joint with the selection in the loop*: each step selects a prompt per example
  exactly as at inference (no gradient through the choice) and minimises next-token loss through
  the chosen prompts, so each prompt is trained on the inputs that choose it. Corpus windows are drawn
  as for every other recovery (:class:`recoup.recover.task_data.TuningData`; a mix ``data="ptb,wiki"`` is
  sampled from the joined text, each source giving its share of validation windows);
- on a task (``task="sciq"``, the same seeded train / held-out split as soft prompts, LoRA and CPET, see
  :mod:`recoup.recover.soft_prompt`): the loss is on the gold continuation only, and the prompt is
  selected from the example's *context* (its question, without the continuation and the padding,
  :func:`recoup.recover.task_data.context_part`), as the Scorer selects at evaluation, where the shared
  context is prefilled before the choices. The selection pass takes the batch's attention mask, so an
  example gets the same prompt padded in a batch or alone; the score statistics come from task contexts;
- the pool is trained with the mode and the K it is used with (both saved with it): in one-prefill mode
  the loss's own forward makes the choice, scored on the corpus window or on the task's context tokens
  only (the continuation's attention is left out, as at evaluation where a shared context is prefilled
  alone); gradients reach every prompt through the first K layers and the chosen one after them.
  The default ``select_layers`` (``DEFAULT_SELECT_LAYERS``) comes from ``benchmarks/idp_prefill.py --part select``.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import json
import logging
from pathlib import Path

import torch
from torch import nn

from recoup.config import check
from recoup.errors import RecoupError
from recoup.model.anatomy import anatomy
from recoup.model.forward import CACHE_ARG, build_inputs, output_cache
from recoup.model.prompt_pool import pool_prefill
from recoup.model.recovery import RECOVERY_RECORD as RECORD
from recoup.model.recovery import Recovery
from recoup.paths import member
from recoup.recover.base import RecoveryMethod
from recoup.recover.prompt import PromptConfig, frozen, init_embeddings, model_meta
from recoup.recover.train import TrainResult, train

log = logging.getLogger(__name__)

WEIGHTS = "idp_pool.safetensors"
ONE_PREFILL, TWO_PASS = "one-prefill", "two-pass"
MODES = (ONE_PREFILL, TWO_PASS)
# K, the decoder layers that score the prompts: the smallest that kept the training choices spread over the pool
# (benchmarks/idp_prefill.py --part select; the figures are in benchmarks/results/idp_select_layers)
DEFAULT_SELECT_LAYERS = 2


@dataclasses.dataclass
class IDPConfig(PromptConfig):
    """A pool of ``pool`` prompts of ``tokens`` each; the prompt and training keys as a soft prompt's
    (:class:`~recoup.recover.prompt.PromptConfig`)."""

    pool: int = 4
    select_layers: int = DEFAULT_SELECT_LAYERS  # the choice is scored on the first K decoder layers (0: all)
    selection: str = ONE_PREFILL  # one-prefill (the choice inside the real prefill) or two-pass (a selection prefill)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.pool >= 2, f"an IDP pool needs at least 2 prompts (got {self.pool})")
        check(self.select_layers >= 0, f"select_layers must be >= 0, 0 meaning all layers (got {self.select_layers})")
        check(self.selection in MODES, f"unknown IDP selection '{self.selection}'; known: {', '.join(MODES)}")
        check(
            not (self.gradient_checkpointing and self.selection == ONE_PREFILL),
            "IDP's one-prefill selection does not run under gradient checkpointing (the recomputed layers would "
            "miss the per-layer masks); turn gradient_checkpointing off or use selection two-pass",
        )


class _SelectionDone(Exception):
    """Raised by the last scored layer's hook: the selection pass needs no further layer."""


@contextlib.contextmanager
def attention_scores(model: nn.Module, n_prefix: int, pool: int, tokens: int, layers: int = 0):
    """Eager attention + hooks adding, per example, the input->prompt attention: yields a (B, m) holder.

    Attention weights (B, heads, T, n_prefix + T) of every layer (or of the first ``layers``, after
    which the forward pass stops with :class:`_SelectionDone`) are reduced as they appear, so only
    one layer's weights are alive at a time. Hooks and the attention implementation are restored
    in ``finally``.
    """
    an = anatomy(model)
    attn_path = an.spec.attention[0].rsplit(".", 1)[0]
    modules = [layer.get_submodule(attn_path) for layer in an.layers]
    if layers and layers < len(modules):
        modules = modules[:layers]
    previous = model.config._attn_implementation
    acc: dict[str, torch.Tensor] = {}
    handles = []

    def hook(_mod, _args, out) -> None:
        weights = out[1] if isinstance(out, tuple) and len(out) > 1 else None
        if weights is None:
            raise RecoupError("IDP needs attention weights, and this model's attention did not return them")
        w = weights[..., 1:n_prefix].float().sum(1)  # (B, T, P-1): heads summed, sink dropped
        mask = acc["mask"]  # (B, T) real input tokens
        per_pos = (w * mask[..., None]).sum(1)  # (B, P-1)
        per_pos = torch.cat([per_pos.new_zeros(per_pos.shape[0], 1), per_pos], 1).view(-1, pool, tokens)
        counts = torch.full((pool,), float(tokens), device=per_pos.device)
        counts[0] -= 1
        acc["scores"] = acc["scores"] + per_pos.sum(-1) / counts.clamp(min=1)
        if _mod is modules[-1] and len(modules) < len(an.layers):
            raise _SelectionDone

    try:
        model.set_attn_implementation("eager")
        handles = [m.register_forward_hook(hook) for m in modules]
        yield acc
    finally:
        for h in handles:
            h.remove()
        model.set_attn_implementation(previous)


class IDPPool(Recovery):
    """A pool (m, n, H) of soft prompts; ``prefix`` selects one per example by attention."""

    method = "idp"

    def __init__(
        self,
        pool: torch.Tensor,
        meta: dict | None = None,
        score_mean: torch.Tensor | None = None,
        score_std: torch.Tensor | None = None,
        standardize: bool = True,
        select_layers: int = DEFAULT_SELECT_LAYERS,
        selection: str = ONE_PREFILL,
    ) -> None:
        if pool.dim() != 3 or pool.shape[0] < 2:
            raise RecoupError(f"an IDP pool is (prompts >= 2, tokens, hidden); got shape {tuple(pool.shape)}")
        if select_layers < 0:
            raise RecoupError(f"select_layers must be >= 0, 0 meaning all layers (got {select_layers})")
        if selection not in MODES:
            raise RecoupError(f"unknown IDP selection '{selection}'; known: {', '.join(MODES)}")
        self.selection = selection
        self.select_layers = int(select_layers)  # the selection pass scores the first K layers (0: all)
        self.pool = nn.Parameter(pool.detach().float().clone())
        m = pool.shape[0]
        self.score_mean = torch.zeros(m) if score_mean is None else score_mean.float().reshape(m).clone()
        self.score_std = torch.ones(m) if score_std is None else score_std.float().reshape(m).clone()
        self.standardize = standardize
        self.meta = dict(meta or {})
        self.choices: list[int] = []  # every example's choice made through prefix(), in order
        self._kv: tuple | None = None  # (model id, pool version, device, cache)

    @property
    def size(self) -> int:
        return self.pool.shape[0]

    @property
    def tokens(self) -> int:
        return self.pool.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.pool.shape[2]

    def _pool_cache(self, model: nn.Module):
        """The pool's key/values, computed once per model and pool state."""
        w = model.get_input_embeddings().weight
        if w.shape[1] != self.hidden_size:
            raise RecoupError(
                f"the recovery's hidden size {self.hidden_size} does not match the model's "
                f"{w.shape[1]}; a prompt attaches only to models of the same hidden size"
            )
        key = (id(model), self.pool._version, w.device, w.dtype)
        if self._kv is None or self._kv[0] != key:
            flat = self.pool.detach().to(device=w.device, dtype=w.dtype).reshape(1, -1, self.hidden_size)
            with torch.no_grad():
                cache = output_cache(model(inputs_embeds=flat, use_cache=True))
            self._kv = (key, cache)
        return self._kv[1]

    def apply(self, model: nn.Module) -> nn.Module:
        """One-prefill mode: attach the pooled-prefill hooks (:mod:`recoup.model.prompt_pool`, inert until
        :meth:`prefix` arms them); the model is otherwise unchanged."""
        if self.selection == ONE_PREFILL:
            pool_prefill(model)
        return model

    def arm(
        self, model: nn.Module, attention_mask: torch.Tensor, choose=None, score_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One-prefill: arm the model's next forward and return the whole pool as its prefix (B, m*n, H).

        ``choose`` maps the raw scores (B, m) to the choice (B,) (default: :meth:`choose`, recorded in
        ``choices``); ``score_mask`` (B, T): the input tokens that score (default: all real ones).
        """
        w = model.get_input_embeddings().weight
        if w.shape[1] != self.hidden_size:
            raise RecoupError(
                f"the recovery's hidden size {self.hidden_size} does not match the model's "
                f"{w.shape[1]}; a prompt attaches only to models of the same hidden size"
            )
        # without gradients the pool's key/values are computed once per model and pool state
        key = None if torch.is_grad_enabled() else (id(self.pool), self.pool._version, w.device, w.dtype)
        pool_prefill(model).arm(
            self.size, self.tokens, attention_mask, self.select_layers, choose or self._record, score_mask, key
        )
        flat = self.pool.reshape(1, -1, self.hidden_size).to(device=w.device, dtype=w.dtype)
        return flat.expand(attention_mask.shape[0], -1, -1)

    def _record(self, raw: torch.Tensor) -> torch.Tensor:
        choice = self.choose(raw)
        self.choices.extend(choice.tolist())
        return choice

    @torch.no_grad()
    def scores(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, m) attention each prompt draws per input token (the selection scores).

        Summed over the scored layers and heads, mean over the prompt's positions (the sink left out) and
        over the input's real tokens, so inputs of different lengths give comparable scores. One-prefill
        mode runs the pooled prefill (:mod:`recoup.model.prompt_pool`); two-pass mode the selection pass.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.selection == ONE_PREFILL:
            prefix = self.arm(model, attention_mask, self.choose)
            model(**build_inputs(model, input_ids, attention_mask, prefix), use_cache=False)
            return pool_prefill(model).last.scores
        b = input_ids.shape[0]
        n_prefix = self.size * self.tokens
        cache = copy.deepcopy(self._pool_cache(model))
        if b > 1:
            cache.batch_repeat_interleave(b)
        mask = torch.cat([attention_mask.new_ones(b, n_prefix), attention_mask], 1)
        pos = n_prefix + (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        with attention_scores(model, n_prefix, self.size, self.tokens, self.select_layers) as acc:
            acc["mask"] = attention_mask.float()
            acc["scores"] = torch.zeros(b, self.size, device=input_ids.device)
            try:
                model(input_ids=input_ids, attention_mask=mask, position_ids=pos, **{CACHE_ARG: cache}, use_cache=True)
            except _SelectionDone:
                pass
            return acc["scores"] / attention_mask.float().sum(1, keepdim=True).clamp(min=1)

    def select(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B,) index of the prompt each example attends to most (standardised scores, see module doc)."""
        return self.choose(self.scores(model, input_ids, attention_mask))

    def choose(self, raw: torch.Tensor) -> torch.Tensor:
        """(B,) argmax of raw scores (B, m), standardised per prompt unless ``standardize`` is off."""
        if not self.standardize:
            return raw.argmax(-1)
        mean, std = self.score_mean.to(raw.device), self.score_std.to(raw.device)
        return ((raw - mean) / std.clamp(min=1e-6)).argmax(-1)

    def observe_scores(self, raw: torch.Tensor, momentum: float = 0.9, first: bool = False) -> None:
        """Update the running per-prompt mean/std of raw scores (B, m)."""
        mean, std = raw.mean(0).cpu(), raw.std(0, unbiased=False).cpu() if raw.shape[0] > 1 else None
        if first:
            self.score_mean = mean
            self.score_std = std if std is not None and (std > 0).all() else mean.abs().clamp(min=1e-6) * 0.1
            return
        self.score_mean = momentum * self.score_mean + (1 - momentum) * mean
        if std is not None:
            self.score_std = momentum * self.score_std + (1 - momentum) * std.clamp(min=1e-6)

    def prefix(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One-prefill: the whole pool (B, m*n, H), the model's next forward armed to choose inside it
        (:meth:`arm`); two-pass: (B, n, H) each example's selected prompt. Choices go to ``choices``."""
        if self.selection == ONE_PREFILL:
            return self.arm(model, attention_mask)
        choice = self.select(model, input_ids, attention_mask)
        self.choices.extend(choice.tolist())
        w = model.get_input_embeddings().weight
        return self.pool[choice.to(self.pool.device)].to(device=w.device, dtype=w.dtype)

    def num_parameters(self) -> int:
        return self.pool.numel()

    def describe(self) -> dict:
        counts = collections.Counter(self.choices)
        return {
            "method": self.method,
            "parameters": self.num_parameters(),
            "pool": self.size,
            "tokens": self.tokens,
            "hidden_size": self.hidden_size,
            "standardize": self.standardize,
            "select_layers": self.select_layers,
            "selection": self.selection,
            "selected": {str(k): counts.get(k, 0) for k in range(self.size)},
            "choices": self.choices[:2000],
            **{k: v for k, v in self.meta.items() if k != "train"},
        }

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        save_file(
            {
                "pool": self.pool.detach().float().contiguous(),
                "score_mean": self.score_mean.contiguous(),
                "score_std": self.score_std.contiguous(),
            },
            str(out / WEIGHTS),
        )
        record = {
            "method": self.method,
            "pool": self.size,
            "tokens": self.tokens,
            "hidden_size": self.hidden_size,
            "weights": WEIGHTS,
            "standardize": self.standardize,
            "select_layers": self.select_layers,
            "selection": self.selection,
            **self.meta,
        }
        (out / RECORD).write_text(json.dumps(record, indent=2, default=str))

    @classmethod
    def load(cls, path: str | Path) -> "IDPPool":
        from safetensors.torch import load_file

        folder = Path(path)
        try:
            record = json.loads((folder / RECORD).read_text())
            tensors = load_file(str(member(folder, record.get("weights", WEIGHTS), f"IDP pool '{folder}'")))
            pool = tensors["pool"]
        except (OSError, ValueError, KeyError) as exc:
            raise RecoupError(f"'{folder}' is not a saved IDP pool ({type(exc).__name__}: {exc})") from None
        meta = {
            k: v
            for k, v in record.items()
            if k
            not in ("method", "pool", "tokens", "hidden_size", "weights", "standardize", "select_layers", "selection")
        }
        # a pool saved before the modes existed was trained and used with the two-pass selection: it stays so
        return cls(
            pool,
            meta,
            tensors.get("score_mean"),
            tensors.get("score_std"),
            record.get("standardize", True),
            record.get("select_layers", 0),
            record.get("selection", TWO_PASS),
        )


def fit_idp(loaded, config: IDPConfig, data=None) -> tuple[IDPPool, TrainResult]:
    """Train an IDP pool on ``loaded.model`` (frozen, bit-identical), selection in the loop (module doc).

    ``data`` (:class:`~recoup.recover.task_data.TuningData`, built from the config when None): a corpus
    gives (batch_size, seqlen) windows with next-token loss, each window selecting on itself; a task gives
    padded batches of context + gold continuation, loss on the continuation, selection on the context.
    """
    from recoup.recover.losses import mean_loss
    from recoup.recover.task_data import context_part, pad_id_of, training_data

    model, tok = loaded.model, loaded.tokenizer
    data = training_data(tok, config) if data is None else data
    pad = pad_id_of(tok)
    rows = init_embeddings(model, tok, config, data.token_ids(), config.pool * config.tokens)
    pool = IDPPool(
        rows.view(config.pool, config.tokens, -1),
        model_meta(loaded),
        select_layers=config.select_layers,
        selection=config.selection,
    )
    device = next(model.parameters()).device
    picks: list[int] = []
    objective = config.objective_loss(loaded)

    def pick(raw: torch.Tensor, observe: bool) -> torch.Tensor:
        if observe:  # training batches update the running score statistics, then select with them
            pool.observe_scores(raw, first=not picks)
        choice = pool.choose(raw)
        picks.extend(choice.tolist())
        return choice

    def one_prefill(b, observe: bool = False) -> torch.Tensor:
        """The whole pool; the choice is made inside the loss's forward, scored on the context's tokens."""
        ctx = b.attention_mask if data.lm else context_part(b)[1]
        score = torch.zeros_like(b.attention_mask)
        score[:, : ctx.shape[1]] = ctx
        return pool.arm(model, b.attention_mask.to(device), lambda raw: pick(raw, observe), score.to(device))

    def two_pass(b, observe: bool = False) -> torch.Tensor:
        """The chosen prompts (B, n, H), chosen by a selection pass over the context."""
        ids, mask = (b.input_ids, b.attention_mask) if data.lm else context_part(b)
        choice = pick(pool.scores(model, ids.to(device), mask.to(device)), observe)
        w = model.get_input_embeddings().weight
        return pool.pool[choice].to(device=w.device, dtype=w.dtype)

    select = one_prefill if config.selection == ONE_PREFILL else two_pass
    with frozen(model):
        base_val = mean_loss(model, data.valid, pad, config.batch_size)
        log.info("idp: validation loss without a prompt %.4f", base_val)
        result = train(
            [pool.pool],
            data.batches(config.batch_size, pad, config.seed),
            lambda b: objective(model, b, device, select(b, observe=True)),
            config.train_config(),
            lambda: mean_loss(model, data.valid, pad, config.batch_size, select),
            tokens_in=lambda b: b.tokens,
            desc="idp",
        )
    counts = collections.Counter(picks)
    pool.meta["train"] = {
        "config": config.to_dict(),
        "result": result.to_dict(),
        "training_selections": {str(k): counts.get(k, 0) for k in range(config.pool)},
        "val_loss_without_prompt": base_val,
    }
    pool.meta["training_selections"] = pool.meta["train"]["training_selections"]
    pool.meta["data"] = data.protocol
    pool.choices = []
    log.info("idp: selections during training %s", dict(sorted(counts.items())))
    return pool, result


METHOD = RecoveryMethod(
    "idp", "Inference-time Dynamic Prompting pool (Hoang et al. 2023)", IDPConfig, fit_idp, IDPPool.load
)
