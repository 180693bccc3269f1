"""Every architecture of the anatomy map, end to end on a tiny random model, as a user runs it: perplexity, a
zero-shot task, compression and a soft prompt, with a tokenizer that has its family's BOS behaviour.

What each family's real tokenizer does with ``tokenizer("a")`` (checked against the hub tokenizers; built here
locally from ``tokenizers``, no downloads):

- llama: adds a BOS (Llama-2 ``<s>``, Llama-3 ``<|begin_of_text|>``); the bundled SmolLM2 (a llama) does NOT
  (its ``<|im_start|>`` BOS is not added: ``add_bos_token`` false);
- mistral: adds ``<s>``;
- gemma3_text: adds ``<bos>``;
- opt: adds a BOS, which for OPT is ``</s>`` (id 2, also its EOS);
- qwen2, qwen3: no BOS token at all (``bos_token`` None), nothing added;
- gpt2: a BOS token exists (``<|endoftext|>``) but is not added.

Under ``--bos auto`` the first four get one BOS at the start of every window and request, the last three
nothing; the results and the artifact's calibration record say which.
"""

from __future__ import annotations

import json
import math

import pytest
from helpers import bos_tokenizer, tiny_model, tiny_tokenizer
from test_run import write_corpus
from transformers import AutoTokenizer

from recoup.cli import main
from recoup.data.bos import tokenizer_bos
from recoup.data.windows import corpus_ids
from recoup.errors import RecoupError
from recoup.model.anatomy import ARCHITECTURES

# family -> (the token its tokenizer puts first, or None; whether it has a bos_token at all)
FAMILY_BOS = {
    "llama": "<s>",
    "mistral": "<s>",
    "gemma3_text": "<s>",
    "opt": "</s>",
    "qwen2": None,
    "qwen3": None,
    "gpt2": None,
}
SEQLEN = 32  # calibration and training windows
EVAL_SEQLEN = 256  # perplexity windows and the Scorer's cap (the char-level tokenizer makes ARC requests long)


def _arc_installed() -> bool:
    from recoup.data.multiple_choice import load_mc

    try:
        load_mc("arc_easy")
    except (RecoupError, OSError):
        return False
    return True


ARC = _arc_installed()


def family_tokenizer(arch: str):
    bos = FAMILY_BOS[arch]
    if bos is not None:
        return bos_tokenizer(bos)
    tok = tiny_tokenizer()
    if arch.startswith("qwen"):
        tok.bos_token = None  # Qwen tokenizers have no BOS token
    return tok


def test_every_architecture_has_a_family_bos_behaviour():
    assert set(FAMILY_BOS) == set(ARCHITECTURES)


def _eval(tmp_path, source, name, corpus, *extra) -> dict:
    out = tmp_path / f"{name}.json"
    tasks = f"ppl:{corpus}" + (",arc_easy" if ARC else "")
    assert (
        main(
            [
                "eval",
                str(source),
                "--tasks",
                tasks,
                "--limit",
                "2",
                "--seqlen",
                str(EVAL_SEQLEN),
                "--batch-size",
                "4",
                "--json",
                str(out),
                *extra,
            ]
        )
        == 0
    )
    return json.loads(out.read_text())


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architecture_end_to_end(arch, tmp_path):
    tok = family_tokenizer(arch)
    src = tmp_path / "model"
    tiny_model(arch).save_pretrained(str(src))
    tok.save_pretrained(str(src))
    corpus = str(write_corpus(tmp_path / "text.txt", n_words=1500))
    bid = tok.convert_tokens_to_ids(FAMILY_BOS[arch]) if FAMILY_BOS[arch] else None
    loaded_tok = AutoTokenizer.from_pretrained(str(src))  # as the CLI loads it (qwen2/3 reload as Qwen2Tokenizer)
    assert tokenizer_bos(loaded_tok) == bid
    n_text = corpus_ids(loaded_tok, corpus, "test").numel()

    dense = _eval(tmp_path, src, "dense", corpus)
    ppl = dense["results"][f"ppl:{corpus}"]
    assert dense["protocol"]["bos"] == "auto" and dense["protocol"]["bos_token_id"] == bid
    assert ppl["bos_token_id"] == bid and math.isfinite(ppl["ppl"]) and ppl["tokens"] == 2 * (EVAL_SEQLEN - 1)
    # with a BOS a window holds EVAL_SEQLEN - 1 text tokens (EVAL_SEQLEN positions in all); without, EVAL_SEQLEN
    assert ppl["windows_available"] == n_text // (EVAL_SEQLEN - (bid is not None))
    if ARC:
        assert 0 <= dense["results"]["arc_easy"]["acc"] <= 1

    art = tmp_path / "art"
    assert (
        main(
            [
                "compress",
                str(src),
                "--method",
                "sparsegpt",
                "--sparsity",
                "0.5",
                "--calib",
                corpus,
                "--nsamples",
                "2",
                "--seqlen",
                str(SEQLEN),
                "--device",
                "cpu",
                "--out",
                str(art),
            ]
        )
        == 0
    )
    calib = json.loads((art / "recoup.json").read_text())["calibration"]
    assert calib["bos"] == "auto" and calib["bos_token_id"] == bid and calib["seqlen"] == SEQLEN

    rec = tmp_path / "prompt"
    assert (
        main(
            [
                "recover",
                str(art),
                "--method",
                "soft-prompt",
                "--data",
                corpus,
                "--tokens",
                "2",
                "--steps",
                "2",
                "--seqlen",
                str(SEQLEN),
                "--eval-every",
                "2",
                "--out",
                str(rec),
            ]
        )
        == 0
    )
    meta = "".join(p.read_text() for p in rec.glob("*.json")).replace(" ", "").replace("\n", "")
    assert f'"bos_token_id":{json.dumps(bid)}' in meta  # the training data's protocol records the BOS

    tuned = _eval(tmp_path, art, "tuned", corpus, "--recovery", str(rec))
    assert math.isfinite(tuned["results"][f"ppl:{corpus}"]["ppl"])
    assert tuned["protocol"]["recovery"] is not None and tuned["protocol"]["bos_token_id"] == bid
    if ARC:
        assert 0 <= tuned["results"]["arc_easy"]["acc"] <= 1
    never = _eval(tmp_path, src, "never", corpus, "--bos", "never")
    assert never["protocol"]["bos_token_id"] is None
    assert (never["results"][f"ppl:{corpus}"]["ppl"] == ppl["ppl"]) == (bid is None)
