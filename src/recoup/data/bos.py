"""The one BOS policy for every path that feeds text to a model (windows, calibration, training, the Scorer).

Models whose tokenizer adds a beginning-of-sequence token by default (Llama, Gemma, OPT) were trained
with it at position 0 and put much of their attention on it (the "attention sink", Xiao et al. 2023,
"Efficient Streaming Language Models with Attention Sinks"); a window that starts mid-text without it is
out of distribution. Policies:

- ``auto`` (default): add one BOS exactly when the tokenizer adds one by default (:func:`tokenizer_bos`);
- ``always``: add the tokenizer's BOS token (an error if it has none);
- ``never``: add nothing (the original GPTQ/SparseGPT scripts' protocol).

Whoever adds it puts exactly one BOS at position 0 of a window or request, never scores it, and keeps
the window at ``seqlen`` positions in all (``seqlen - 1`` text tokens after the BOS).
"""

from __future__ import annotations

from recoup.errors import RecoupError

BOS_POLICIES = ("auto", "always", "never")


def check_policy(policy: str) -> None:
    """One clear line for an unknown policy (before any model loads)."""
    if policy not in BOS_POLICIES:
        raise RecoupError(f"unknown bos policy '{policy}'; use {', '.join(BOS_POLICIES)}")


def tokenizer_bos(tokenizer) -> int | None:
    """The id of the single token the tokenizer puts in front of a text by default, or None.

    Detected from what it does, not from its name: ``tokenizer("a")`` against the same text with
    ``add_special_tokens=False``. One extra leading token that is the tokenizer's ``bos_token_id`` (Llama's
    ``<s>``, Gemma's ``<bos>``, OPT's ``</s>``) counts; no extra token (GPT-2, Qwen) or a trailing one
    (an EOS) does not."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    with_special = list(tokenizer("a", verbose=False).input_ids)
    plain = list(tokenizer("a", add_special_tokens=False, verbose=False).input_ids)
    extra = len(with_special) - len(plain)
    if extra >= 1 and with_special[0] == bos and with_special[1 : 1 + len(plain)] == plain and plain[:1] != [bos]:
        return int(bos)
    return None


def bos_id(tokenizer, policy: str = "auto") -> int | None:
    """The BOS id every window / request starts with under ``policy``, or None when nothing is added."""
    check_policy(policy)
    if policy == "never":
        return None
    if policy == "auto":
        return tokenizer_bos(tokenizer)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise RecoupError("--bos always: this tokenizer has no BOS token; use --bos auto or never")
    return int(bos)


def bos_record(tokenizer, policy: str = "auto") -> dict:
    """What a result's protocol / an artifact's calibration record says about the BOS."""
    bid = bos_id(tokenizer, policy)
    return {"bos": policy, "bos_token_id": bid}


def with_bos(ids: list[int], bos: int | None, room: int) -> list[int]:
    """``ids`` cut from the left to ``room`` positions, starting with exactly one ``bos`` when it is set.

    A leading ``bos`` already in ``ids`` (a chat template that writes its BOS as text) is kept as the one
    BOS, never doubled. With ``bos`` None: ``ids[-room:]`` (may be empty)."""
    if room < 1:
        raise RecoupError(f"no room for a context ({room} positions)")
    if bos is None:
        return list(ids[max(0, len(ids) - room) :])
    body = list(ids[1:] if ids and ids[0] == bos else ids)
    return [bos] + body[max(0, len(body) - (room - 1)) :]
