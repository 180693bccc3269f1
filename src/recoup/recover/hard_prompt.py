"""Hard prompts: a fixed text prepended to every input at evaluation.

Compress-Then-Prompt (Xu et al. 2023) opens with such a case study: telling a compressed model
"The weight matrix inside the language model contains errors. Make any necessary adjustments to
ensure optimal performance." A hard prompt is a :class:`~recoup.model.recovery.Recovery` whose
prefix is the input embeddings of the text's tokens, (P, H), looked up in the model it is attached
to, so it is never scored and works with every evaluation path that honours ``prefix``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from recoup.config import Config
from recoup.errors import RecoupError
from recoup.model.recovery import RECOVERY_RECORD as RECORD
from recoup.model.recovery import Recovery
from recoup.recover.base import RecoveryMethod

CTP_CASE_STUDY = (
    "The weight matrix inside the language model contains errors. "
    "Make any necessary adjustments to ensure optimal performance."
)


@dataclasses.dataclass
class HardPromptConfig(Config):
    """A hard prompt is its text (default: Compress-Then-Prompt's case-study prompt)."""

    text: str = CTP_CASE_STUDY


class HardPrompt(Recovery):
    """A text prefix; ``token_ids`` come from the tokenizer of the model it is used with."""

    method = "hard-prompt"

    def __init__(self, text: str, token_ids: list[int]) -> None:
        if not text or not token_ids:
            raise RecoupError("a hard prompt needs a non-empty text")
        self.text = text
        self.token_ids = list(token_ids)

    @classmethod
    def from_text(cls, text: str, tokenizer) -> "HardPrompt":
        """Tokenize ``text`` without special tokens (the input keeps its own BOS handling)."""
        if not text or not text.strip():
            raise RecoupError("--prompt-text is empty; give the text to prepend")
        return cls(text, tokenizer(text, add_special_tokens=False).input_ids)

    def prefix(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(P, H): the text's token embeddings in ``model``."""
        emb = model.get_input_embeddings()
        if max(self.token_ids) >= emb.weight.shape[0]:
            raise RecoupError(
                f"the hard prompt's token ids exceed the model's vocabulary ({emb.weight.shape[0]}); "
                f"it was tokenized for another tokenizer: pass the text again with --prompt-text"
            )
        return emb(torch.tensor(self.token_ids, device=emb.weight.device))

    def num_parameters(self) -> int:
        return 0

    def describe(self) -> dict:
        return {"method": self.method, "parameters": 0, "text": self.text, "tokens": len(self.token_ids)}

    def save(self, path: str | Path) -> None:
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        (out / RECORD).write_text(
            json.dumps({"method": self.method, "text": self.text, "token_ids": self.token_ids}, indent=2)
        )

    @classmethod
    def load(cls, path: str | Path) -> "HardPrompt":
        data = json.loads((Path(path) / RECORD).read_text())
        try:
            return cls(data["text"], data["token_ids"])
        except KeyError as exc:
            raise RecoupError(f"'{path}': hard-prompt record lacks {exc}") from None


def fit_hard_prompt(loaded, config: HardPromptConfig, data=None) -> tuple[HardPrompt, None]:
    """Nothing to learn: the text tokenized for ``loaded``'s tokenizer."""
    return HardPrompt.from_text(config.text, loaded.tokenizer), None


METHOD = RecoveryMethod(
    "hard-prompt",
    "a fixed text prefix, never scored (Compress-Then-Prompt's hard prompt)",
    HardPromptConfig,
    fit_hard_prompt,
    HardPrompt.load,
)
