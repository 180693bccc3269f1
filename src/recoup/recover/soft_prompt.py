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

CPU-friendly defaults (the paper: 100 tokens, lr 1e-3, 1024-token sequences): 20 tokens, lr 3e-2
(a few dozen steps need a larger rate; 3e-2 beat 1e-2 in a 12-step probe on SmolLM2-135M), 256-token
sequences, batch 2, 80 steps, validation every 15 steps (4 windows of the corpus). On the shared
2-core machine one step (512 tokens) of SmolLM2-135M takes about 7 CPU seconds with one thread
(``OMP_NUM_THREADS=1``; two threads were 3x slower under contention).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from recoup.config import Config, check
from recoup.errors import RecoupError
from recoup.model.forward import forward_logits
from recoup.model.recovery import Recovery
from recoup.recover.train import TrainConfig, TrainResult, train

log = logging.getLogger(__name__)

INITS = ("vocab", "text", "random")
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
TRAIN_RECORD = "recoup_train.json"


@dataclasses.dataclass
class SoftPromptConfig(Config):
    """Soft-prompt training settings (CPU-friendly defaults; see the module doc for the paper's)."""

    tokens: int = 20  # prompt length n
    init: str = "vocab"  # vocab (rows of frequent tokens) | text | random
    init_text: str | None = None
    data: str | None = None  # corpus (ptb, wiki, ...) or a .txt/.jsonl file, comma-separated mix; ptb without task
    task: str | None = None  # a multiple-choice task (sciq, arc_easy ...): train on its train part instead
    heldout_fraction: float | None = None  # task only: the share kept out (default 0.3, LoRA/CPET's split)
    seqlen: int = 256  # corpus: window length; task: max tokens per example (context cut from the left)
    batch_size: int = 2
    steps: int = 80
    lr: float = 3e-2
    warmup: float = 0.05
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    eval_every: int = 15
    val_windows: int | None = None  # corpus: valid-split windows scored per validation (default 4); not with task
    seed: int = 0
    time_budget_s: float | None = None

    def __post_init__(self) -> None:
        check(self.tokens >= 1, f"tokens must be >= 1 (got {self.tokens})")
        check(self.init in INITS, f"unknown init '{self.init}'; use one of {', '.join(INITS)}")
        check(self.init != "text" or bool(self.init_text), "init 'text' needs init_text")
        check(self.seqlen >= 2, f"seqlen must be >= 2 (got {self.seqlen})")
        check(self.batch_size >= 1, f"batch_size must be >= 1 (got {self.batch_size})")
        check(self.task is None or self.data is None, "give a task (--task T) or data (--data SRC), not both")
        if self.task is not None:
            self.heldout_fraction = 0.3 if self.heldout_fraction is None else self.heldout_fraction
            check(0 < self.heldout_fraction < 1, f"heldout_fraction must be in (0, 1) (got {self.heldout_fraction})")
            check(bool(self.task.strip()), "task is empty; name a multiple-choice task (sciq, arc_easy ...)")
            check(self.val_windows is None, "val_windows applies to corpus training; with a task, validation is "
                                            "the seeded 64-example slice of the task's train part")
        else:
            check(self.heldout_fraction is None, "heldout_fraction applies only with a task (--task T)")
            self.data = "ptb" if self.data is None else self.data
            self.val_windows = 4 if self.val_windows is None else self.val_windows
            check(self.val_windows >= 1, f"val_windows must be >= 1 (got {self.val_windows})")
            check(bool(self.data.strip()), "data is empty; name a corpus (ptb, wiki) or a text file")
        self.train_config()  # validates steps, lr, warmup, eval_every

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.steps, lr=self.lr, weight_decay=self.weight_decay, warmup=self.warmup,
                           max_grad_norm=self.max_grad_norm, eval_every=self.eval_every, seed=self.seed,
                           time_budget_s=self.time_budget_s)


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
        return {"method": self.method, "parameters": self.num_parameters(), "tokens": self.tokens,
                "hidden_size": self.hidden_size, **{k: v for k, v in self.meta.items() if k != "train"}}

    def save(self, path: str | Path) -> None:
        """PEFT prompt-tuning layout (+ ``recoup_train.json`` with how it was trained)."""
        from safetensors.torch import save_file

        from recoup.recover.lora import peft_base_path

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        cfg = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": self.tokens,
               "token_dim": self.hidden_size, "num_transformer_submodules": 1,
               "num_attention_heads": self.meta.get("num_attention_heads"), "num_layers": self.meta.get("num_layers"),
               "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
               "tokenizer_kwargs": None, "base_model_name_or_path": peft_base_path(self.meta.get("base_model")),
               "inference_mode": True, "revision": None, "auto_mapping": None, "modules_to_save": None}
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
            raise RecoupError(f"'{folder}' is not a saved soft prompt ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0]})") from None
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


# ----------------------------------------------------------------------------------------- data


def split_ids(tokenizer, data: str, split: str) -> torch.Tensor:
    """Token ids of one corpus (or a comma-separated mix) for ``split``.

    A file has no splits: its first 90% is ``train`` and its last 10% ``valid``/``test``.
    """
    from recoup.data.calibration import tokenize_corpus
    from recoup.data.corpora import load_corpus

    parts = []
    for name in [d.strip() for d in data.split(",") if d.strip()]:
        is_file = Path(name).expanduser().is_file()
        ids = tokenize_corpus(tokenizer, load_corpus(name, "train" if is_file else split))
        if is_file:
            cut = int(ids.numel() * 0.9)
            ids = ids[:cut] if split == "train" else ids[cut:]
        parts.append(ids)
    return torch.cat(parts)


def window_batches(ids: torch.Tensor, seqlen: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless (batch_size, seqlen) windows at seeded random offsets of a 1-D id tensor."""
    if ids.numel() <= seqlen:
        raise RecoupError(f"the training text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, ids.numel() - seqlen, (batch_size,), generator=gen).tolist()
        yield torch.stack([ids[s: s + seqlen] for s in starts])


def val_windows(ids: torch.Tensor, seqlen: int, count: int) -> torch.Tensor:
    """The first ``count`` non-overlapping windows (fewer if the text is short): (k, seqlen)."""
    k = min(count, ids.numel() // seqlen)
    if k < 1:
        raise RecoupError(f"the validation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: k * seqlen].view(k, seqlen)


def lm_loss(model: nn.Module, x: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
    """Mean next-token NLL of windows x (B, T) with a prefix (P, H) or (B, P, H); prefix never scored."""
    logits = forward_logits(model, x, None, prefix)[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


@contextlib.contextmanager
def frozen(model: nn.Module):
    """Backbone frozen (no grads, eval mode) for the duration; flags restored in ``finally``."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def init_embeddings(model: nn.Module, tokenizer, config: SoftPromptConfig, train_ids: torch.Tensor,
                    rows: int) -> torch.Tensor:
    """(rows, H) initial prompt: rows of frequent training tokens (Lester et al.), a text, or random."""
    emb = model.get_input_embeddings().weight.detach().float().cpu()
    gen = torch.Generator().manual_seed(config.seed)
    if config.init == "text":
        ids = tokenizer(config.init_text, add_special_tokens=False).input_ids
        if not ids:
            raise RecoupError("init_text tokenizes to nothing")
        ids = (ids * math.ceil(rows / len(ids)))[:rows]
        return emb[torch.tensor(ids)].clone()
    if config.init == "vocab":
        counts = torch.bincount(train_ids, minlength=emb.shape[0])[: emb.shape[0]]
        common = torch.argsort(counts, descending=True)[: max(rows, 5000)]
        common = common[counts[common] > 0]
        pick = common[torch.randperm(common.numel(), generator=gen)[:rows]]
        if pick.numel() < rows:  # tiny corpora: repeat
            pick = pick.repeat(math.ceil(rows / pick.numel()))[:rows]
        return emb[pick].clone()
    return torch.randn(rows, emb.shape[1], generator=gen) * emb.std()


def model_meta(loaded) -> dict:
    cfg = loaded.model.config
    return {"base_model": str(loaded.source), "hidden_size": int(loaded.model.get_input_embeddings().weight.shape[1]),
            "num_attention_heads": getattr(cfg, "num_attention_heads", None),
            "num_layers": getattr(cfg, "num_hidden_layers", None), "model_type": getattr(cfg, "model_type", None)}


def fit_soft_prompt(loaded, config: SoftPromptConfig) -> tuple[SoftPrompt, TrainResult]:
    """Learn a soft prompt on ``loaded.model`` (kept frozen, bit-identical) with next-token loss.

    With ``config.task`` see :func:`fit_soft_prompt_on_task`. Otherwise windows (batch_size, seqlen) are drawn at seeded offsets of the data's train split; validation
    is the mean NLL of ``val_windows`` windows of its valid split; the best prompt is kept.
    """
    if config.task is not None:
        return fit_soft_prompt_on_task(loaded, config)
    model, tok = loaded.model, loaded.tokenizer
    train_ids = split_ids(tok, config.data, "train")
    val = val_windows(split_ids(tok, config.data, "valid"), config.seqlen, config.val_windows)
    prompt = SoftPrompt(init_embeddings(model, tok, config, train_ids, config.tokens), model_meta(loaded))
    device = next(model.parameters()).device

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        return lm_loss(model, x.to(device), prompt.prefix(model, x, x))

    def validate(with_prompt: bool = True) -> float:
        return sum(lm_loss(model, v[None].to(device), prompt.prefix(model, v, v) if with_prompt else None).item()
                   for v in val) / len(val)

    with frozen(model):
        with torch.no_grad():
            base_val = validate(with_prompt=False)
        log.info("soft-prompt: validation loss without a prompt %.4f (ppl %.2f)", base_val, math.exp(base_val))
        result = train([prompt.embeddings], window_batches(train_ids, config.seqlen, config.batch_size, config.seed),
                       loss_fn, config.train_config(), validate, tokens_in=lambda b: b.numel(), desc="soft-prompt")
    prompt.meta["train"] = {"config": config.to_dict(), "result": result.to_dict(), "val_loss_without_prompt": base_val}
    return prompt, result


def task_tuning(loaded, config: SoftPromptConfig):
    """The task's :class:`~recoup.recover.task_data.TuningData`: the same seeded split LoRA/CPET train on."""
    from recoup.recover.task_data import tuning_data

    return tuning_data(loaded.tokenizer, task=config.task, max_len=config.seqlen,
                       heldout_fraction=config.heldout_fraction, seed=config.seed)


def tuning_ids(tuning) -> torch.Tensor:
    """Every token id of the training sequences, 1-D (for the vocab init)."""
    return torch.tensor([i for s in tuning.train for i in s.ids], dtype=torch.long)


def fit_soft_prompt_on_task(loaded, config: SoftPromptConfig) -> tuple[SoftPrompt, TrainResult]:
    """Learn a soft prompt on the train part of ``config.task`` (loss on the gold continuation only).

    Batches: ``batch_size`` examples (context + gold continuation, at most ``seqlen`` tokens) right-padded,
    the prompt (n, H) prepended; prompt positions, context and padding are not scored. Validation is the
    token-weighted mean loss on ``tuning.valid`` (a seeded slice of the train part); the best prompt is
    kept. The held-out part is never seen; its protocol is recorded in ``meta["data"]``.
    """
    from recoup.recover.task_data import batch_stream, mean_loss, pad_id_of, prefixed_loss

    model, tok = loaded.model, loaded.tokenizer
    tuning = task_tuning(loaded, config)
    pad = pad_id_of(tok)
    prompt = SoftPrompt(init_embeddings(model, tok, config, tuning_ids(tuning), config.tokens), model_meta(loaded))
    device = next(model.parameters()).device

    def prefix(b):
        return prompt.prefix(model, b.input_ids, b.attention_mask)

    def validate(with_prompt: bool = True) -> float:
        return mean_loss(model, tuning.valid, pad, config.batch_size, prefix if with_prompt else None)

    with frozen(model):
        base_val = validate(with_prompt=False)
        log.info("soft-prompt: %s validation loss without a prompt %.4f (%d train, %d valid examples)",
                 config.task, base_val, len(tuning.train), len(tuning.valid))
        result = train([prompt.embeddings], batch_stream(tuning.train, config.batch_size, pad, config.seed),
                       lambda b: prefixed_loss(model, b, device, prefix(b)),
                       config.train_config(), validate, tokens_in=lambda b: b.tokens, desc="soft-prompt")
    prompt.meta["data"] = tuning.protocol
    prompt.meta["train"] = {"config": config.to_dict(), "result": result.to_dict(), "val_loss_without_prompt": base_val}
    return prompt, result
