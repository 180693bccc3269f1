"""The Scorer: the one place that runs a model for evaluation (docs/design.md, "Contracts").

Tasks hand it requests; it batches them, runs the model and hands back numbers or text:

- :meth:`Scorer.loglikelihood` ``(context, continuation)`` -> (sum log p(continuation | context), is_greedy),
  tokenized exactly as lm-evaluation-harness does (Gao et al. 2021, "A framework for few-shot language
  model evaluation"): trailing context whitespace moves to the continuation, the continuation's ids are
  the tail of ``encode(context + continuation)``. Requests are grouped by context; each distinct
  context is run **once** (its KV cache is then copied to every continuation of that context), and
  contexts are batched sorted by length so padding stays small.
- :meth:`Scorer.generate`: greedy decoding with a KV cache, batched, left-padded, stop strings.
- :meth:`Scorer.rolling_loglikelihood`: lm-eval's disjoint rolling windows for whole-text likelihood.

A recovery (``recoup.model.recovery.Recovery``) is attached once (``apply``) and asked for an
input-embedding prefix per batch (``prefix``: (P, H) or per-example (B, P, H)); every forward goes
through :func:`recoup.model.forward.build_inputs` so the prefix and left padding work for every
architecture in the anatomy map. Continuation and decode steps extend that forward's attention mask
and position ids over the cached keys/values.

BOS (:mod:`recoup.data.bos`): under ``auto`` a model whose tokenizer adds a BOS gets exactly one at the
start of every request's tokens (loglikelihood contexts, rolling windows, generation prompts), never
scored; a context that already starts with it (a chat template writing its BOS as text) keeps that one.
Requests are still encoded without special tokens, so the continuation split is lm-eval's. A recovery's
prefix goes in front of the whole request, BOS included (as in training). Otherwise nothing is added.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from recoup.data.bos import bos_id, with_bos
from recoup.errors import RecoupError
from recoup.model import parallel
from recoup.model.forward import CACHE_ARG, build_inputs, keeps_logits, output_cache

log = logging.getLogger(__name__)

TokenPair = tuple[tuple[int, ...], tuple[int, ...]]


class Scorer:
    """Batched, recovery-aware loglikelihood, greedy generation and rolling likelihood.

    ``attached=True`` says the caller already ran ``recovery.apply(model)`` (the runner does that
    once for all tasks); otherwise the Scorer does it here.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        recovery: Any = None,
        batch_size: int = 8,
        max_length: int | None = None,
        progress: bool = True,
        attached: bool = False,
        bos: str = "auto",
    ) -> None:
        if batch_size < 1:
            raise RecoupError(f"batch size must be at least 1 (got {batch_size})")
        self.model = recovery.apply(model) if (recovery is not None and not attached) else model
        self.tokenizer = tokenizer
        self.recovery = recovery
        self.batch_size = batch_size
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_length = min(max_length or 2048, limit)
        self.progress = progress
        self.device = next(model.parameters()).device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self.prefix_token = next(
            (t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id) if t is not None), self.pad_id
        )
        self.bos = bos
        self.bos_id = bos_id(tokenizer, bos)  # None: nothing added
        eos = {tokenizer.eos_token_id}
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
        self.eos_ids = sorted(int(e) for e in eos if e is not None)
        self._keep_arg = keeps_logits(self.model)

    # ----------------------------------------------------------------- tokenization
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def context(self, ids: Sequence[int], room: int) -> tuple[int, ...]:
        """A request's context cut from the left to ``room`` positions: exactly one BOS first under the BOS
        policy, else the plain tail (the prefix token when empty)."""
        if self.bos_id is not None:
            return tuple(with_bos(list(ids), self.bos_id, room))
        return tuple(ids[-room:]) if ids else (self.prefix_token,)

    def encode_pair(self, context: str, continuation: str) -> TokenPair:
        """lm-eval's split: context ids and the continuation's ids as the tail of the joint encoding."""
        if not context:
            return (self.prefix_token,), tuple(self.encode(continuation))
        n_space = len(context) - len(context.rstrip())
        if n_space:
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return tuple(ctx), tuple(whole[len(ctx) :])

    # ----------------------------------------------------------------- forward pieces
    def _prefill(
        self, rows: list[Sequence[int]], keep: int = 1, cache: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Run left-padded ``rows`` with the recovery prefix.

        Returns log-probs of the last ``keep`` positions (B, keep, V), the attention mask (B, P+T) and the
        KV cache. Only the kept positions go through the LM head (``logits_to_keep``).
        """
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        prefix = self.recovery.prefix(self.model, ids, mask) if self.recovery is not None else None
        kwargs = build_inputs(self.model, ids, mask, prefix)
        if self._keep_arg:
            kwargs["logits_to_keep"] = keep
        out = self.model(**kwargs, use_cache=cache)
        return F.log_softmax(out.logits[:, -keep:].float(), dim=-1), kwargs["attention_mask"], output_cache(out)

    def _extend(self, ids: torch.Tensor, mask: torch.Tensor, past_mask: torch.Tensor, cache: Any) -> torch.Tensor:
        """Run ``ids`` (R, L) after cached positions whose mask is ``past_mask`` (R, M); returns log-probs (R, L, V).

        ``mask`` (R, L) marks real tokens (right padding); positions continue from each row's count of
        attended past positions, exactly as :func:`build_inputs` numbers them.
        """
        full_mask = torch.cat([past_mask, mask], dim=1)
        position_ids = past_mask.sum(-1, keepdim=True) + (mask.cumsum(-1) - 1).clamp(min=0)
        embeds = self.model.get_input_embeddings()(ids)
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=full_mask,
            position_ids=position_ids,
            **{CACHE_ARG: cache},
            use_cache=True,
        )
        return F.log_softmax(out.logits.float(), dim=-1)

    # ----------------------------------------------------------------- loglikelihood
    def loglikelihood(
        self, requests: Sequence[tuple[str, str]], desc: str = "loglikelihood"
    ) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, whether greedy decoding reproduces it) per (context, continuation)."""
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in requests], desc=desc)

    @torch.no_grad()
    def loglikelihood_tokens(self, pairs: Sequence[TokenPair], desc: str = "loglikelihood") -> list[tuple[float, bool]]:
        """Token-level :meth:`loglikelihood`: each distinct context is run once, its cache shared by its
        continuations."""
        groups: dict[tuple[int, ...], list[int]] = {}
        conts: list[tuple[int, ...]] = []
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise RecoupError("a loglikelihood request has an empty continuation")
            room = self.max_length + 1 - len(cont)  # the last continuation token is never an input
            if room < 1:
                raise RecoupError(f"a continuation of {len(cont)} tokens does not fit max_length {self.max_length}")
            ctx = self.context(ctx, room)
            groups.setdefault(ctx, []).append(i)
            conts.append(tuple(cont))
        # longest first: padding stays small within a batch and a too-large batch fails at once
        order = sorted(groups, key=lambda c: -(len(c) + max(len(conts[i]) for i in groups[c])))
        batches: list[list[tuple[int, ...]]] = []
        for ctx in order:
            if batches and sum(len(groups[c]) for c in batches[-1]) + len(groups[ctx]) <= self.batch_size:
                batches[-1].append(ctx)
            else:
                batches.append([ctx])
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        self.model.eval()
        bar = tqdm(total=len(batches), desc=desc, unit="batch", disable=not self.progress, leave=False)

        def score(batch: list[tuple[int, ...]]) -> list[tuple[int, tuple[float, bool]]]:
            bar.update()
            if all(len(groups[c]) == 1 for c in batch):  # nothing shared: one forward over context + continuation
                return list(
                    zip([groups[c][0] for c in batch], self._score_joined(batch, [conts[groups[c][0]] for c in batch]))
                )
            last, past_mask, cache = self._prefill(batch)
            last = last[:, -1]
            rows = [(b, i) for b, ctx in enumerate(batch) for i in groups[ctx]]
            sel = torch.tensor([b for b, _ in rows], device=self.device)
            first = torch.tensor([conts[i][0] for _, i in rows], device=self.device)
            first_lp = last[sel].gather(1, first[:, None])[:, 0]
            first_greedy = last[sel].argmax(-1) == first
            width = max(len(conts[i]) for _, i in rows) - 1
            if width > 0:
                ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long, device=self.device)
                tgt = torch.zeros((len(rows), width), dtype=torch.long, device=self.device)
                mask = torch.zeros((len(rows), width), dtype=torch.long, device=self.device)
                for r, (_, i) in enumerate(rows):
                    n = len(conts[i]) - 1
                    if n:
                        ids[r, :n] = torch.tensor(conts[i][:-1])
                        tgt[r, :n] = torch.tensor(conts[i][1:])
                        mask[r, :n] = 1
                if len(rows) != len(batch) or rows != [(b, groups[c][0]) for b, c in enumerate(batch)]:
                    cache.batch_select_indices(sel)
                logp = self._extend(ids, mask, past_mask[sel], cache)
                rest_lp = (logp.gather(2, tgt[..., None])[..., 0] * mask).sum(-1)
                rest_greedy = ((logp.argmax(-1) == tgt) | (mask == 0)).all(-1)
            else:
                rest_lp = torch.zeros_like(first_lp)
                rest_greedy = torch.ones_like(first_greedy)
            return [
                (i, (float(first_lp[r] + rest_lp[r]), bool(first_greedy[r] and rest_greedy[r])))
                for r, (_, i) in enumerate(rows)
            ]

        for done in parallel.sharded_map(score, batches):  # under torchrun: each rank a shard of the batches
            for i, result in done:
                results[i] = result
        bar.close()
        return results  # type: ignore[return-value]

    def _score_joined(self, ctxs: list[tuple[int, ...]], conts: list[tuple[int, ...]]) -> list[tuple[float, bool]]:
        """(log-prob sum, greedy) of each continuation from one left-padded forward over context + continuation."""
        keep = max(len(c) for c in conts) + 1
        logp, _, _ = self._prefill([list(a) + list(b) for a, b in zip(ctxs, conts)], keep=keep, cache=False)
        out = []
        for r, cont in enumerate(conts):
            n = len(cont)
            lp = logp[r, keep - 1 - n : keep - 1]
            tgt = torch.tensor(cont, device=self.device)
            out.append((float(lp.gather(1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all())))
        return out

    # ----------------------------------------------------------------- window likelihood (GPTQ perplexity)
    @torch.no_grad()
    def window_nll(self, windows: torch.Tensor, desc: str = "perplexity") -> tuple[float, int]:
        """(summed next-token NLL, scored tokens) of token windows (n, T), ``batch_size`` windows per forward.

        Each window is its own context (the GPTQ/SparseGPT protocol): its first token (the BOS, when the
        windowing put one there) is not scored, the recovery's prefix is prepended and never scored.
        """
        from recoup.model.forward import forward_logits

        starts = list(range(0, windows.shape[0], self.batch_size))
        bar = tqdm(total=len(starts), desc=desc, unit="batch", disable=not self.progress, leave=False)

        def nll(start: int) -> tuple[float, int]:
            bar.update()
            x = windows[start : start + self.batch_size].to(self.device)
            prefix = self.recovery.prefix(self.model, x, torch.ones_like(x)) if self.recovery is not None else None
            logits = forward_logits(self.model, x, None, prefix)[:, :-1].float()
            return (
                F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item(),
                x[:, 1:].numel(),
            )

        total, count = 0.0, 0
        for part, n in parallel.sharded_map(nll, starts):  # summed in batch order: the same float on any rank count
            total += part
            count += n
        bar.close()
        return total, count

    # ----------------------------------------------------------------- rolling likelihood
    def rolling_windows(self, tokens: Sequence[int], window: int | None = None) -> list[TokenPair]:
        """lm-eval's ``get_rolling_token_windows`` (context_len=1) made disjoint: every token scored once.

        ``window`` defaults to ``max_length - 1`` so a window and its one context token fit; under the BOS
        policy every window's context becomes the BOS (:meth:`context`)."""
        window = window or self.max_length - 1
        tokens = list(tokens)
        if not tokens:
            return []
        first = min(window, len(tokens))
        pairs: list[TokenPair] = [((self.prefix_token,), tuple(tokens[:first]))]
        done = first
        while done < len(tokens):
            n = min(len(tokens) - done, window)
            end = done + n
            ctx = tokens[max(0, end - window - 1) : end - 1]
            pairs.append((tuple(ctx[: len(ctx) - (n - 1)]), tuple(tokens[end - n : end])))
            done = end
        return pairs

    def rolling_loglikelihood(self, texts: Sequence[str], window: int | None = None) -> list[tuple[float, int]]:
        """(sum log-prob, token count) of each whole text, scored in disjoint windows of ``window`` tokens."""
        spans, pairs = [], []
        for text in texts:
            w = self.rolling_windows(self.encode(text), window)
            spans.append((len(pairs), len(pairs) + len(w)))
            pairs.extend(w)
        scores = self.loglikelihood_tokens(pairs, desc="rolling") if pairs else []
        return [(sum(s for s, _ in scores[a:b]), sum(len(pairs[k][1]) for k in range(a, b))) for a, b in spans]

    # ----------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 32,
        stop: Sequence[str] = (),
        desc: str = "generate",
        stop_after_space: bool = True,
    ) -> list[str]:
        """Greedy continuations of ``prompts`` (text after the prompt only), cut at the first stop string or EOS.

        With ``stop_after_space`` (recoup's tasks) stop strings are looked for after the continuation's
        leading whitespace, so an answer that starts on a new line is not cut to nothing by a newline
        stop; without it they are looked for anywhere, as lm-evaluation-harness's ``until`` does.
        """
        if max_new_tokens < 1:
            raise RecoupError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
        room = self.max_length - max_new_tokens
        if room < 1:
            raise RecoupError(
                f"max_new_tokens {max_new_tokens} leaves no room for a prompt in {self.max_length} tokens"
            )
        encoded = [list(self.context(self.encode(p), room)) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        outputs: list[str] = [""] * len(prompts)
        eos = set(self.eos_ids)
        self.model.eval()
        starts = list(range(0, len(order), self.batch_size))
        bar = tqdm(total=len(starts), desc=desc, unit="batch", disable=not self.progress, leave=False)

        def greedy(start: int) -> list[tuple[int, str]]:
            bar.update()
            idx = order[start : start + self.batch_size]
            logp, mask, cache = self._prefill([encoded[i] for i in idx])
            logp = logp[:, -1]
            n = len(idx)
            done = [False] * n  # host-side: one device->host copy of the step's tokens, not one per row
            new: list[list[int]] = [[] for _ in range(n)]
            for step in range(max_new_tokens):
                tok = logp.argmax(-1)
                for r, t in enumerate(tok.tolist()):
                    if done[r]:
                        continue
                    if t in eos:
                        done[r] = True
                        continue
                    new[r].append(t)
                    if stop:
                        text = self.tokenizer.decode(new[r], skip_special_tokens=True)
                        done[r] = any(x in (text.lstrip() if stop_after_space else text) for x in stop if x)
                if all(done) or step == max_new_tokens - 1:
                    break
                step_mask = torch.ones((n, 1), dtype=mask.dtype, device=self.device)
                logp = self._extend(tok[:, None], step_mask, mask, cache)[:, -1]
                mask = torch.cat([mask, step_mask], dim=1)
            return [
                (i, _cut(self.tokenizer.decode(new[r], skip_special_tokens=True), stop, stop_after_space))
                for r, i in enumerate(idx)
            ]

        for done in parallel.sharded_map(greedy, starts):  # under torchrun: each rank a shard of the batches
            for i, text in done:
                outputs[i] = text
        bar.close()
        return outputs

    def chat_prompt(self, message: str) -> str:
        """``message`` as one user turn in the tokenizer's chat template, ready for the assistant's answer."""
        if not getattr(self.tokenizer, "chat_template", None):
            return message
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )


def _cut(text: str, stop: Sequence[str], after_space: bool = True) -> str:
    """``text`` up to the first stop string found (after its leading whitespace when ``after_space``)."""
    lead = len(text) - len(text.lstrip()) if after_space else 0
    hits = [text.find(s, lead) for s in stop if s and text.find(s, lead) >= 0]
    return text[: min(hits)] if hits else text
