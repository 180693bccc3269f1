"""The tokenizer in GGUF metadata, as llama.cpp reads it (``tokenizer.ggml.*``).

Byte-level BPE tokenizers (GPT-2 style: SmolLM, Qwen, Llama 3, ...) are written as ``tokenizer.ggml.model
= gpt2`` with the vocabulary in id order, token types, merges and special ids (gguf's ``SpecialVocab``
reads those from ``tokenizer.json`` / ``tokenizer_config.json``). ``tokenizer.ggml.pre`` names llama.cpp's
pre-tokenizer; it is read off the tokenizer's own pre-tokenizer description (data, not the model's name):
a plain byte-level regex is ``gpt2``, a Split on one of the known regexes is that regex's name. Other
tokenizer kinds (SentencePiece / Unigram) are refused by :func:`check_tokenizer`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from recoup.errors import RecoupError

log = logging.getLogger(__name__)

# llama.cpp pre-tokenizer name -> the Split regex transformers' tokenizer.json carries for it
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_PRE = {_QWEN2: "qwen2", _LLAMA3: "llama-bpe"}


def _tokenizer_json(path: Path) -> dict[str, Any]:
    f = path / "tokenizer.json"
    if not f.is_file():
        raise RecoupError(f"'{path}' has no tokenizer.json; GGUF export needs a fast (tokenizers) tokenizer")
    return json.loads(f.read_text())


def _pre_name(pre: dict[str, Any] | None) -> str | None:
    """llama.cpp's name for a byte-level pre-tokenizer description, or None if it is not one we know."""
    if not pre:
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt2"
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        kinds = [p.get("type") for p in parts]
        if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex"):
            return "smollm"  # llama.cpp's digits-apart + GPT-2 regex
        if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
            return SPLIT_PRE.get((parts[0].get("pattern") or {}).get("Regex"))
    return None


def check_tokenizer(path: Path) -> str:
    """The llama.cpp pre-tokenizer name for the tokenizer saved at ``path``; RecoupError when it cannot be
    written as GGUF byte-level BPE."""
    tj = _tokenizer_json(path)
    model = (tj.get("model") or {}).get("type")
    if model != "BPE" or not json.dumps(tj.get("decoder") or {}).count("ByteLevel"):
        raise RecoupError(f"GGUF export writes byte-level BPE tokenizers only; this one is {model} "
                          f"(decoder {(tj.get('decoder') or {}).get('type')}); use --format hf or compressed-tensors")
    pre = _pre_name(tj.get("pre_tokenizer"))
    if pre is None:
        raise RecoupError("GGUF export: the tokenizer's pre-tokenizer is not one llama.cpp names "
                          f"({json.dumps(tj.get('pre_tokenizer'))[:120]}); use --format hf or compressed-tensors")
    return pre


def add_tokenizer(writer: Any, tokenizer: Any, path: Path, vocab_size: int, pre: str) -> None:
    """Write the tokenizer at ``path`` (also loaded as ``tokenizer``) into ``writer`` for a model whose
    embedding has ``vocab_size`` rows (ids past the tokenizer are ``[PAD<i>]``, type UNUSED)."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    if max(by_id) >= vocab_size:
        raise RecoupError(f"the tokenizer has ids up to {max(by_id)} but the model only {vocab_size} embeddings")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(path, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise RecoupError(f"'{path}/tokenizer.json' lists no BPE merges; it cannot be written as GGUF")
    if "bos" not in special.add_special_token:  # what the HF tokenizer does, so llama.cpp does the same
        ids = tokenizer("a")["input_ids"]
        special.add_special_token["bos"] = bool(ids) and ids[0] == tokenizer.bos_token_id
    special.add_to_gguf(writer, quiet=True)
    if tokenizer.chat_template and special.chat_template is None:
        writer.add_chat_template(tokenizer.chat_template)
