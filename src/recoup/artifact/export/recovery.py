"""A recovery travelling with an exported model: copied beside it with ``base_model_name_or_path`` pointing
at the export (so ``peft.AutoPeftModelForCausalLM.from_pretrained(OUT/recovery)`` finds its base), or, for
a LoRA into ``--format hf`` with ``--merge``, merged into the weights.

The artifact room sits below ``recover/``, so this reads the saved files (PEFT's layout and
``recoup_recovery.json``), never recoup's recovery classes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from recoup.errors import RecoupError

PEFT_CONFIG = "adapter_config.json"
RECORD = "recoup_recovery.json"
SUBDIR = "recovery"


def describe_recovery(path: str | Path) -> dict[str, Any]:
    """{"path", "peft_type" (or None), "method"} of the saved recovery at ``path``; one line when it is not one."""
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise RecoupError(f"--recovery: no recovery directory at '{path}'")
    try:
        peft_type = (
            json.loads((folder / PEFT_CONFIG).read_text()).get("peft_type")
            if (folder / PEFT_CONFIG).is_file()
            else None
        )
        method = json.loads((folder / RECORD).read_text()).get("method") if (folder / RECORD).is_file() else None
    except json.JSONDecodeError as exc:
        raise RecoupError(f"--recovery '{path}': corrupt metadata ({exc})") from None
    if peft_type is None and method is None:
        raise RecoupError(f"--recovery '{path}' is not a saved recovery (no {PEFT_CONFIG} or {RECORD})")
    return {"path": str(folder), "peft_type": peft_type, "method": method or str(peft_type).lower()}


def check_recovery(rec: dict[str, Any], fmt: str, merge: bool) -> None:
    """Refuse what cannot travel: a merge of anything but a LoRA, and recoveries beside a GGUF file
    (PEFT cannot load a GGUF base; llama.cpp takes its own LoRA format)."""
    if merge and rec["peft_type"] != "LORA":
        raise RecoupError(f"--merge merges a LoRA; '{rec['path']}' is a {rec['method']} recovery")
    if merge and rec["method"] == "cpet":
        raise RecoupError("--merge: a CPET recovery has modules beside its LoRA and cannot be merged")
    if fmt == "gguf":
        raise RecoupError(
            "--recovery with --format gguf: PEFT cannot load a GGUF base and llama.cpp's LoRA "
            "format is not written yet; export the recovery with --format hf or compressed-tensors"
        )


def place_recovery(rec: dict[str, Any], out: Path, final: Path) -> Path:
    """Copy the recovery into ``out/recovery`` with ``base_model_name_or_path`` set to ``final`` (where the
    export lands: an absolute path, what PEFT resolves)."""
    dest = out / SUBDIR
    shutil.copytree(rec["path"], dest)
    cfg_file = dest / PEFT_CONFIG
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        cfg["base_model_name_or_path"] = str(final)
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    record = dest / RECORD
    if record.is_file():
        info = json.loads(record.read_text())
        info.update({"base_model": str(final), "exported_from": rec["path"]})
        record.write_text(json.dumps(info, indent=1))
    return dest


def merge_lora(model: nn.Module, rec: dict[str, Any]) -> nn.Module:
    """``W + (alpha / r) * B @ A`` written into every targeted linear (PEFT's ``merge_and_unload``); the
    result is dense: pruned zeros fill in and quantized weights leave their grid."""
    import peft

    return peft.PeftModel.from_pretrained(model, rec["path"]).merge_and_unload()
