"""Data for tuning a recovery: a task split into train / held-out, a corpus, or a user jsonl file.

The data packs ship validation splits only, so a task used for tuning is split by a *seeded hash* of
each example's text into a train part and a held-out part; scoring uses the held-out part only, and
the same (task, fraction, seed) always gives the same split. Three objectives feed one batch type:

- a multiple-choice task (``task:sciq``, ``task:boolq``): context + the gold continuation, loss on
  the continuation tokens only (the lm-evaluation-harness prompt of the task);
- a corpus (``ptb``, ``wiki``, a ``.txt`` file): language-model loss on ``seqlen``-token windows;
- a user ``.jsonl`` file whose lines are ``{"text"}`` (LM loss on all of it) or
  ``{"prompt", "completion"}`` (loss on the completion only).

Under the BOS policy (:mod:`recoup.data.bos`, ``config.bos``) every sequence and window of a model whose
tokenizer adds a BOS starts with exactly one, never scored, within the same ``seqlen`` / ``max_len``: the
Scorer's requests look the same at evaluation.

LoRA and CPET train on these batches directly; soft prompts and IDP pools put their prompt in front
(:mod:`recoup.recover.losses`: ``prefixed_loss``, ``mean_loss`` with ``prefix_fn``; IDP selects on
:func:`context_part`).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
from pathlib import Path
from typing import Iterator

import torch

from recoup.errors import RecoupError
from recoup.model import parallel
from recoup.registry import unknown_name_message

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MCExample:
    """One multiple-choice example: per choice a context and a continuation (leading space kept).

    Built from the evaluation suite's examples (:func:`recoup.data.multiple_choice.load_mc`),
    so tuning uses exactly the prompts the suite scores (lm-evaluation-harness templates).
    """

    key: str  # the text the split hashes
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]
    gold: int

    @classmethod
    def from_suite(cls, ex: dict) -> "MCExample":
        return cls(
            key=f"{ex['id']}|{ex['contexts'][ex['gold']]}",
            contexts=tuple(ex["contexts"]),
            continuations=tuple(ex["continuations"]),
            choices=tuple(ex["choices"]),
            gold=int(ex["gold"]),
        )

    def as_suite(self) -> dict:
        return {
            "id": self.key,
            "contexts": list(self.contexts),
            "continuations": list(self.continuations),
            "choices": list(self.choices),
            "gold": self.gold,
        }

    @property
    def gold_pair(self) -> tuple[str, str]:
        return self.contexts[self.gold], self.continuations[self.gold]


def load_task_examples(task: str) -> list[MCExample]:
    """Every example of a multiple-choice task of the evaluation suite (its validation split), in file order."""
    from recoup.data.multiple_choice import ZERO_SHOT_TASKS, load_mc

    if task not in ZERO_SHOT_TASKS:
        raise RecoupError(unknown_name_message("tuning task", task, ZERO_SHOT_TASKS))
    return [MCExample.from_suite(ex) for ex in load_mc(task)]


def hash_fraction(key: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by ``(seed, key)`` (sha256)."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:12], 16) / float(16**12)


@dataclasses.dataclass
class TaskSplit:
    """A task cut into disjoint train and held-out parts by a seeded hash."""

    task: str
    train: list[MCExample]
    heldout: list[MCExample]
    heldout_fraction: float
    seed: int

    @property
    def protocol(self) -> dict:
        return {
            "task": self.task,
            "split": "validation (the packs ship no train split)",
            "heldout_fraction": self.heldout_fraction,
            "seed": self.seed,
            "n_train": len(self.train),
            "n_heldout": len(self.heldout),
            "rule": "sha256(f'{seed}:{key}') < fraction -> held-out",
        }


def split_task(
    task: str, heldout_fraction: float = 0.3, seed: int = 0, examples: list[MCExample] | None = None
) -> TaskSplit:
    """Split ``task`` into train / held-out; an example's part depends only on its text and ``seed``."""
    if not 0 < heldout_fraction < 1:
        raise RecoupError(f"--heldout-fraction must be in (0, 1) (got {heldout_fraction})")
    examples = load_task_examples(task) if examples is None else examples
    train, heldout = [], []
    for ex in examples:
        (heldout if hash_fraction(ex.key, seed) < heldout_fraction else train).append(ex)
    if not train or not heldout:
        raise RecoupError(f"task '{task}' has {len(examples)} examples, too few to split at {heldout_fraction}")
    return TaskSplit(task=task, train=train, heldout=heldout, heldout_fraction=heldout_fraction, seed=seed)


# ---------------------------------------------------------------- training sequences and batches


@dataclasses.dataclass
class Sequence:
    """Token ids and the index of the first token that is scored by the loss."""

    ids: list[int]
    first_scored: int = 1


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False).input_ids


def completion_sequence(tokenizer, context: str, completion: str, max_len: int, bos: int | None = None) -> Sequence:
    """context + completion, the context cut from the left so the whole is at most ``max_len`` tokens;
    with ``bos`` the context starts with exactly that one BOS (as the Scorer's requests do)."""
    from recoup.data.bos import with_bos

    ctx, comp = _encode(tokenizer, context), _encode(tokenizer, completion)
    if not comp:
        raise RecoupError(f"empty completion after tokenization for context {context[:40]!r}")
    comp = comp[: max_len - 1]
    if bos is not None:
        ctx = with_bos(ctx, bos, max_len - len(comp))
    else:
        ctx = ctx[max(0, len(ctx) - (max_len - len(comp))) :] or [tokenizer.eos_token_id]
    return Sequence(ids=ctx + comp, first_scored=len(ctx))


def task_sequences(tokenizer, examples: list[MCExample], max_len: int = 256, bos: int | None = None) -> list[Sequence]:
    """Context + gold continuation per example (loss on the continuation only)."""
    return [completion_sequence(tokenizer, *ex.gold_pair, max_len, bos) for ex in examples]


def text_sequence(tokenizer, text: str, max_len: int, bos: int | None = None) -> Sequence | None:
    """A text, LM loss on all of it (the BOS, when set, first and unscored); None if under 2 tokens."""
    ids = _encode(tokenizer, text)[: max_len - (bos is not None)]
    if len(ids) < 2:
        return None
    return Sequence(ids=[bos] + ids) if bos is not None else Sequence(ids=ids)


def jsonl_sequences(tokenizer, path: str | Path, max_len: int = 256, bos: int | None = None) -> list[Sequence]:
    """Lines ``{"text": ...}`` (loss on all tokens) or ``{"prompt": ..., "completion": ...}``."""
    path = Path(path)
    if not path.is_file():
        raise RecoupError(f"data file not found: '{path}'")
    opener = gzip.open if path.name.endswith(".gz") else open
    out: list[Sequence] = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if "prompt" in row and "completion" in row:
                    out.append(completion_sequence(tokenizer, str(row["prompt"]), str(row["completion"]), max_len, bos))
                else:
                    seq = text_sequence(tokenizer, str(row["text"]), max_len, bos)
                    if seq is not None:
                        out.append(seq)
            except (json.JSONDecodeError, KeyError, TypeError):
                raise RecoupError(
                    f"{path}:{i}: expected a JSON object with 'text', or 'prompt' and 'completion', per line"
                ) from None
    if not out:
        raise RecoupError(f"{path} holds no usable examples")
    return out


@dataclasses.dataclass
class TuningData:
    """What a recovery trains on: training batches, validation sequences and where they came from.

    Two kinds behind one interface (:meth:`batches`, ``valid``, :meth:`token_ids`):

    - a corpus (``lm_ids`` set): endless (batch_size, seqlen) windows at seeded offsets of the train
      split (:func:`recoup.data.windows.window_stream`, the calibration sampler), every token after the
      first scored; validation = the first ``val_windows`` windows of the valid split;
    - sequences (a task, a jsonl file): context + completion, loss on the completion, reshuffled every epoch.
    """

    train: list[Sequence]
    valid: list[Sequence]
    protocol: dict
    split: TaskSplit | None = None
    lm_ids: torch.Tensor | None = None  # corpus: the train split's ids, 1-D
    seqlen: int = 256
    bos_id: int | None = None  # every window / sequence starts with this BOS (recoup.data.bos), or nothing

    @property
    def lm(self) -> bool:
        """True for a corpus (language-model loss on every token)."""
        return self.lm_ids is not None

    def batches(self, batch_size: int, pad_id: int, seed: int) -> Iterator["Batch"]:
        """Endless seeded batches of ``batch_size`` (the global batch). Under a data-parallel launcher each
        rank gets its contiguous slice of the same global batch (:mod:`recoup.model.parallel`)."""
        world = parallel.world_size()
        if batch_size < world:
            raise RecoupError(
                f"batch_size {batch_size} is the global batch; it must be at least the number of processes ({world})"
            )
        if self.lm_ids is not None:
            from recoup.data.windows import window_stream

            return (
                collate([Sequence(ids=w.tolist()) for w in x[parallel.my_slice(len(x))]], pad_id)
                for x in window_stream(self.lm_ids, self.seqlen, batch_size, seed, self.bos_id)
            )
        return batch_stream(self.train, batch_size, pad_id, seed=seed)

    def token_ids(self) -> torch.Tensor:
        """Every training token id, 1-D (a prompt's vocab init counts them)."""
        if self.lm_ids is not None:
            return self.lm_ids
        skip = int(self.bos_id is not None)  # the BOS each sequence starts with is not training text
        return torch.tensor([i for s in self.train for i in s.ids[skip:]], dtype=torch.long)


def training_data(tokenizer, config) -> TuningData:
    """The one builder of recovery training data, from a config's ``data`` / ``task`` keys
    (:class:`recoup.recover.train.FitConfig`): every method samples the same way from the same source."""
    bos = getattr(config, "bos", "auto")
    if config.task is not None:
        return tuning_data(
            tokenizer,
            task=config.task,
            max_len=config.seqlen,
            heldout_fraction=config.heldout_fraction,
            seed=config.seed,
            bos=bos,
        )
    return tuning_data(
        tokenizer,
        data=config.data,
        max_len=config.seqlen,
        seed=config.seed,
        val_windows=config.val_windows or 4,
        bos=bos,
    )


def tuning_data(
    tokenizer,
    task: str | None = None,
    data: str | None = None,
    max_len: int = 256,
    heldout_fraction: float = 0.3,
    seed: int = 0,
    valid_size: int = 64,
    val_windows: int = 4,
    bos: str = "auto",
) -> TuningData:
    """Build tuning data from ``task`` (a task name) or ``data`` (a corpus name, a comma-separated mix,
    a .txt or a .jsonl file).

    For a task, ``valid_size`` examples of the *train* part (a seeded draw) are the validation set the
    training loop uses to keep its best state; the held-out part is never seen during tuning. For a
    corpus, each source of a mix gives ``max(1, val_windows // sources)`` validation windows. ``bos``: the
    BOS policy (auto | always | never), recorded in the protocol.
    """
    from recoup.data.bos import bos_id

    if (task is None) == (data is None):
        raise RecoupError("give exactly one of --task T or --data SRC")
    bid = bos_id(tokenizer, bos)
    record = {"bos": bos, "bos_token_id": bid}
    gen = torch.Generator().manual_seed(seed)
    if task is not None:
        split = split_task(task, heldout_fraction, seed)
        seqs = task_sequences(tokenizer, split.train, max_len, bid)
        order = torch.randperm(len(seqs), generator=gen).tolist()
        n_valid = min(valid_size, len(seqs) // 5)
        valid = [seqs[i] for i in order[:n_valid]]
        train = [seqs[i] for i in order[n_valid:]]
        protocol = {
            **split.protocol,
            "objective": "loss on the gold continuation",
            "max_len": max_len,
            "n_valid_from_train": n_valid,
            **record,
        }
        return TuningData(train=train, valid=valid, protocol=protocol, split=split, bos_id=bid)
    name = str(data)
    if name.endswith((".jsonl", ".jsonl.gz")):
        seqs = jsonl_sequences(tokenizer, name, max_len, bid)
        order = torch.randperm(len(seqs), generator=gen).tolist()
        n_valid = min(valid_size, max(1, len(seqs) // 10)) if len(seqs) > 1 else 0
        return TuningData(
            train=[seqs[i] for i in order[n_valid:]],
            valid=[seqs[i] for i in order[:n_valid]],
            protocol={"data": name, "objective": "jsonl", "max_len": max_len, "seed": seed, **record},
            bos_id=bid,
        )
    from recoup.data.windows import consecutive_windows, corpus_ids, corpus_names, text_per_window

    names = corpus_names(name)
    per = max(1, val_windows // len(names))
    valid = [
        Sequence(ids=w.tolist())
        for n in names
        for w in consecutive_windows(corpus_ids(tokenizer, n, "valid", split_files=True), max_len, per, bid)
    ]
    train_ids = corpus_ids(tokenizer, name, "train", split_files=True)
    if train_ids.numel() <= text_per_window(max_len, bid):
        raise RecoupError(f"the training text has {train_ids.numel()} tokens, fewer than one window of {max_len}")
    return TuningData(
        train=[],
        valid=valid,
        lm_ids=train_ids,
        seqlen=max_len,
        bos_id=bid,
        protocol={
            "corpus": name,
            "objective": "language model",
            "seqlen": max_len,
            "seed": seed,
            "sampling": "seeded random offsets of the train split",
            "val_windows": len(valid),
            **record,
        },
    )


@dataclasses.dataclass
class Batch:
    """Right-padded ids (B, T), attention mask (B, T) and labels (B, T) with -100 where not scored."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(seqs: list[Sequence], pad_id: int) -> Batch:
    width = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s.ids)
        ids[i, :n] = torch.tensor(s.ids)
        mask[i, :n] = 1
        labels[i, s.first_scored : n] = ids[i, s.first_scored : n]
    return Batch(ids, mask, labels)


def batch_stream(seqs: list[Sequence], batch_size: int, pad_id: int, seed: int = 0) -> Iterator[Batch]:
    """Endless batches, reshuffled every epoch by a seeded generator; each rank gets its slice of every batch."""
    if not seqs:
        raise RecoupError("no training sequences")
    gen = torch.Generator().manual_seed(seed)
    world = parallel.world_size()
    while True:
        order = torch.randperm(len(seqs), generator=gen).tolist()
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            if len(chosen) < world:  # data parallel: an epoch's tail too short to give every rank a row
                continue
            yield collate([seqs[i] for i in chosen[parallel.my_slice(len(chosen))]], pad_id)


def context_part(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The unscored context of each row: ids (B, C) and mask (B, C), C the longest context.

    A row's context is its real tokens before the first scored one (the task's question); the
    continuation and the padding are masked out, so an input-dependent prefix (IDP's selection) sees
    what the Scorer's prefill sees at evaluation, whatever the row's padding in the batch.
    """
    before = (batch.labels != -100).long().cumsum(-1) == 0
    ctx = batch.attention_mask.bool() & before
    width = max(1, int(ctx.sum(-1).max()))
    return batch.input_ids[:, :width], ctx[:, :width].long()


def pad_id_of(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)
