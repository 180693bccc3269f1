"""The README's ten-minute walkthrough runs as written: its commands, on a tiny random model with tiny sizes.

The commands are the fenced ``bash`` block right after ``<!-- walkthrough -->`` in README.md (``RECOUP_README``
names another file, e.g. a draft). Each ``recoup`` line runs through the real CLI with the bundled model replaced by
a tiny random one and the sizes shrunk (``--nsamples``, ``--seqlen``, ``--limit``, ``--rank`` ...); every other
word is kept. Without the data packs, ``ptb`` becomes a local text file and the pack-backed tasks are dropped.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest
from helpers import _packs_present, tiny_config

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- walkthrough -->"
TINY = {
    "--nsamples": "2",
    "--seqlen": "32",
    "--limit": "2",
    "--rank": "2",
    "--steps": "2",
    "--group-size": "32",
    "--tokens": "2",
    "--batch-size": "2",
}


def save_tiny_bpe(path: Path) -> None:
    """A tiny random llama with a byte-level BPE tokenizer (the kind GGUF export writes), saved as a HF directory."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog 0123456789", "Question: which is a planet? Answer: Mars"]
    tk.train_from_iterator(
        text * 20,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", hidden=64, layers=2, vocab=len(tok) + 4)).eval()
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))


def readme() -> Path:
    return Path(os.environ.get("RECOUP_README", ROOT / "README.md"))


def walkthrough(text: str) -> list[str]:
    """The command lines of the bash block after the walkthrough marker (continuation lines joined)."""
    assert MARKER in text, f"README has no {MARKER} block"
    block = text.split(MARKER, 1)[1].lstrip()
    assert block.startswith("```bash"), f"{MARKER} must be followed by a ```bash block"
    body = block[len("```bash") :].split("```", 1)[0]
    return [line.strip() for line in body.replace("\\\n", " ").splitlines() if line.strip()]


def shrink(argv: list[str], model: str, corpus: str, packs: bool = False) -> list[str]:
    """The same command on the tiny model: sizes shrunk, PTB replaced by ``corpus`` (tokenizing all of PTB with a
    300-token BPE is most of the time otherwise); without ``packs``, the pack-backed tasks dropped."""
    out, i = [], 0
    while i < len(argv):
        word = argv[i]
        if word in TINY and i + 1 < len(argv):
            # eval's --seqlen also caps the scoring context: room for a character-level ARC question
            out += [word, "256" if word == "--seqlen" and argv[0] == "eval" else TINY[word]]
            i += 2
            continue
        if word == "--limits" and i + 1 < len(argv):
            key = argv[i + 1].split("=", 1)[0]
            if packs:
                out += [word, f"{key}=2"]
            i += 2
            continue
        if word == "smollm2-135m":
            word = model
        elif word == "ptb" and out and out[-1] in ("--calib", "--data"):
            word = corpus
        elif out and out[-1] == "--tasks":
            tasks = [f"ppl:{corpus}" if t == "ppl:ptb" else t for t in word.split(",")]
            word = ",".join(t for t in tasks if packs or t.startswith("ppl:"))
        out.append(word)
        i += 1
    return out


def test_the_walkthrough_extracts_and_covers_every_stage():
    commands = walkthrough(readme().read_text(encoding="utf-8"))
    verbs = {shlex.split(c)[1] for c in commands if shlex.split(c)[0] == "recoup"}
    assert {"compress", "eval", "recover", "export"} <= verbs, verbs


def test_the_walkthrough_runs(tmp_path, monkeypatch, capsys):
    from recoup.cli import main

    commands = walkthrough(readme().read_text(encoding="utf-8"))
    save_tiny_bpe(tmp_path / "tiny")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog, again and again.\n" * 400, encoding="utf-8")
    packs = _packs_present()
    monkeypatch.chdir(tmp_path)
    ran = []
    for line in commands:
        argv = shlex.split(line)
        if argv[0] != "recoup" or argv[1] == "setup":  # activating the venv; setup installs the real model
            continue
        tiny = shrink(argv[1:], str(tmp_path / "tiny"), str(corpus), packs)
        code = main(tiny)
        assert code == 0, f"`{line}` (run as `recoup {' '.join(tiny)}`) exited {code}: {capsys.readouterr().err}"
        ran.append(argv[1])
        for flag in ("--out", "--json"):  # what the command says it writes, it wrote
            if flag in tiny:
                assert (tmp_path / tiny[tiny.index(flag) + 1]).exists(), f"`{line}` wrote no {flag}"
    assert "compress" in ran and "recover" in ran and "export" in ran


@pytest.mark.parametrize(
    "argv,expected",
    [
        (
            ["eval", "smollm2-135m", "--tasks", "ppl:ptb,arc_easy", "--seqlen", "512", "--limits", "arc_easy=100"],
            ["eval", "M", "--tasks", "ppl:C", "--seqlen", "256"],
        ),
        (
            ["compress", "smollm2-135m", "--calib", "ptb", "--nsamples", "16", "--group-size", "64"],
            ["compress", "M", "--calib", "C", "--nsamples", "2", "--group-size", "32"],
        ),
    ],
)
def test_shrink_without_packs(argv, expected):
    assert shrink(argv, "M", "C") == expected


def test_shrink_with_packs_keeps_the_tasks():
    argv = ["eval", "smollm2-135m", "--tasks", "ppl:ptb,arc_easy", "--limits", "arc_easy=100"]
    assert shrink(argv, "M", "C", packs=True) == ["eval", "M", "--tasks", "ppl:C,arc_easy", "--limits", "arc_easy=2"]
