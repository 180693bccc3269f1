"""Soft prompts learned on a frozen compressed model: Compress-Then-Prompt.

Xu et al. 2023, "Compress, Then Prompt: Improving Accuracy-Efficiency Trade-off of LLM Inference
with Transferable Prompt". ``n`` virtual token embeddings, shape (n, H), are prepended to the
input embeddings of a *frozen* (compressed) model; the attention mask is extended and the prompt
positions are never scored (:func:`recoup.model.forward.forward_logits` drops them). The prompt is
saved in PEFT's prompt-tuning layout (``adapter_config.json`` + ``adapter_model.safetensors`` holding
``prompt_embeddings``), so ``peft.PeftModel.from_pretrained`` loads it, and it attaches to any model
of the same hidden size.

Two objectives (``data`` and ``task`` are exclusive):

- corpus (default, ``data="ptb"``): next-token loss on ``seqlen``-token windows at seeded offsets of the
  corpus' train split; validation is the mean NLL of ``val_windows`` windows of its valid split;
- task (``task="sciq"``): the multiple-choice task's train part of the seeded hash split that LoRA/CPET
  use (:func:`recoup.recover.task_data.tuning_data`, ``heldout_fraction`` and ``seed``), so the held-out
  part ``recoup compare-recovery`` scores is identical across methods and never seen. Each example is
  context + gold continuation, at most ``seqlen`` tokens (context cut from the left), right-padded
  in batches; the loss is on the gold continuation only (prompt positions and padding never scored);
  validation is the mean loss on the seeded 64-example slice of the train part. The split protocol is
  saved with the prompt (``meta["data"]``).

CPU-friendly defaults (the paper: 100 tokens, lr 1e-3, 1024-token sequences): 20 tokens, lr 3e-2 (a run of a
few dozen steps needs a larger rate than the paper's thousands), 256-token sequences, batch 2, 80 steps,
validation every 15 steps (4 windows of the corpus).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import torch
from torch import nn

from recoup.errors import RecoupError
from recoup.model.recovery import PEFT_CONFIG, PEFT_WEIGHTS, TRAIN_RECORD, Recovery
from recoup.recover.base import RecoveryMethod, peft_base_path
from recoup.recover.prompt import PromptConfig, frozen, init_embeddings, model_meta
from recoup.recover.train import TrainResult, train

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SoftPromptConfig(PromptConfig):
    """Soft-prompt settings (CPU-friendly defaults; see the module doc for the paper's): the prompt keys of
    :class:`~recoup.recover.prompt.PromptConfig` and the training keys of :class:`~recoup.recover.train.FitConfig`."""


class SoftPrompt(Recovery):
    """A soft prompt: ``embeddings`` (n, H) prepended to every input."""

    method = "soft-prompt"

    def __init__(self, embeddings: torch.Tensor, meta: dict | None = None) -> None:
        if embeddings.dim() != 2:
            raise RecoupError(f"a soft prompt is (tokens, hidden); got shape {tuple(embeddings.shape)}")
        self.embeddings = nn.Parameter(embeddings.detach().float().clone())
        self.meta = dict(meta or {})

    @property
    def tokens(self) -> int:
        return self.embeddings.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.embeddings.shape[1]

    def prefix(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(n, H) on the model's device and dtype (differentiable, for training)."""
        w = model.get_input_embeddings().weight
        return self.embeddings.to(device=w.device, dtype=w.dtype)

    def num_parameters(self) -> int:
        return self.embeddings.numel()

    def describe(self) -> dict:
        return {
            "method": self.method,
            "parameters": self.num_parameters(),
            "tokens": self.tokens,
            "hidden_size": self.hidden_size,
            **{k: v for k, v in self.meta.items() if k != "train"},
        }

    def save(self, path: str | Path) -> None:
        """PEFT prompt-tuning layout (+ ``recoup_train.json`` with how it was trained)."""
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        cfg = {
            "peft_type": "PROMPT_TUNING",
            "task_type": "CAUSAL_LM",
            "num_virtual_tokens": self.tokens,
            "token_dim": self.hidden_size,
            "num_transformer_submodules": 1,
            "num_attention_heads": self.meta.get("num_attention_heads"),
            "num_layers": self.meta.get("num_layers"),
            "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": None,
            "tokenizer_name_or_path": None,
            "tokenizer_kwargs": None,
            "base_model_name_or_path": peft_base_path(self.meta.get("base_model")),
            "inference_mode": True,
            "revision": None,
            "auto_mapping": None,
            "modules_to_save": None,
        }
        (out / PEFT_CONFIG).write_text(json.dumps(cfg, indent=2))
        save_file({"prompt_embeddings": self.embeddings.detach().float().contiguous()}, str(out / PEFT_WEIGHTS))
        (out / TRAIN_RECORD).write_text(json.dumps({"method": self.method, **self.meta}, indent=2, default=str))

    @classmethod
    def load(cls, path: str | Path) -> "SoftPrompt":
        from safetensors.torch import load_file

        folder = Path(path)
        try:
            cfg = json.loads((folder / PEFT_CONFIG).read_text())
            weights = load_file(str(folder / PEFT_WEIGHTS))
        except (OSError, ValueError) as exc:
            raise RecoupError(
                f"'{folder}' is not a saved soft prompt ({type(exc).__name__}: {str(exc).splitlines()[0]})"
            ) from None
        if cfg.get("peft_type") != "PROMPT_TUNING" or "prompt_embeddings" not in weights:
            raise RecoupError(f"'{folder}' is not a PEFT prompt-tuning adapter (peft_type {cfg.get('peft_type')})")
        emb = weights["prompt_embeddings"]
        if cfg.get("num_transformer_submodules", 1) != 1:
            raise RecoupError(f"'{folder}': only decoder-only prompts (num_transformer_submodules 1) are supported")
        meta = {}
        record = folder / TRAIN_RECORD
        if record.is_file():
            meta = {k: v for k, v in json.loads(record.read_text()).items() if k != "method"}
        return cls(emb, meta)


def fit_soft_prompt(loaded, config: SoftPromptConfig, data=None) -> tuple[SoftPrompt, TrainResult]:
    """Learn a soft prompt on ``loaded.model`` (kept frozen, bit-identical).

    ``data`` (:class:`~recoup.recover.task_data.TuningData`, built from the config's data/task keys when
    None): a corpus gives (batch_size, seqlen) windows at seeded offsets of its train split, next-token
    loss; a task gives padded batches of context + gold continuation (at most ``seqlen`` tokens), loss on
    the continuation only. The prompt (n, H) is prepended and never scored; validation is the
    token-weighted mean loss on ``data.valid``; the best prompt is kept. A task's split protocol is
    recorded in ``meta["data"]``.
    """
    from recoup.recover.losses import mean_loss
    from recoup.recover.task_data import pad_id_of, training_data

    model, tok = loaded.model, loaded.tokenizer
    data = training_data(tok, config) if data is None else data
    pad = pad_id_of(tok)
    prompt = SoftPrompt(init_embeddings(model, tok, config, data.token_ids(), config.tokens), model_meta(loaded))
    device = next(model.parameters()).device
    objective = config.objective_loss(loaded)

    def prefix(b):
        return prompt.prefix(model, b.input_ids, b.attention_mask)

    def validate(with_prompt: bool = True) -> float:
        return mean_loss(model, data.valid, pad, config.batch_size, prefix if with_prompt else None)

    with frozen(model):
        base_val = validate(with_prompt=False)
        log.info("soft-prompt: validation loss without a prompt %.4f (ppl %.2f)", base_val, math.exp(base_val))
        result = train(
            [prompt.embeddings],
            data.batches(config.batch_size, pad, config.seed),
            lambda b: objective(model, b, device, prefix(b)),
            config.train_config(),
            validate,
            tokens_in=lambda b: b.tokens,
            desc="soft-prompt",
        )
    prompt.meta["data"] = data.protocol
    prompt.meta["train"] = {"config": config.to_dict(), "result": result.to_dict(), "val_loss_without_prompt": base_val}
    return prompt, result


METHOD = RecoveryMethod(
    "soft-prompt",
    "Compress-Then-Prompt soft prompt (Xu et al. 2023)",
    SoftPromptConfig,
    fit_soft_prompt,
    SoftPrompt.load,
    peft_type="PROMPT_TUNING",
)
