"""Load a saved recovery from its directory, whatever the method.

Dispatch on the layout:

- a PEFT adapter (``adapter_config.json``): its ``peft_type`` names the method through
  :data:`PEFT_TYPES` (``PROMPT_TUNING`` -> ``soft-prompt``);
- otherwise ``recoup_recovery.json`` whose ``"method"`` names it (``idp``, ``hard-prompt``).

Methods register a loader ``path -> Recovery`` in :data:`LOADERS` (explicit, house style 2). To add
one (e.g. LoRA): ``LOADERS.register("lora", LoRA.load)`` in :func:`_register_builtin` and, for a
PEFT layout, ``PEFT_TYPES["LORA"] = "lora"``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from recoup.errors import RecoupError
from recoup.model.recovery import Recovery
from recoup.registry import Registry

Loader = Callable[[Path], Recovery]
LOADERS: Registry[Loader] = Registry("recovery method")
PEFT_TYPES: dict[str, str] = {"PROMPT_TUNING": "soft-prompt"}
RECORD = "recoup_recovery.json"
PEFT_CONFIG = "adapter_config.json"


def _soft_prompt(path: Path) -> Recovery:
    from recoup.recover.soft_prompt import SoftPrompt

    return SoftPrompt.load(path)


def _idp(path: Path) -> Recovery:
    from recoup.recover.idp import IDPPool

    return IDPPool.load(path)


def _hard_prompt(path: Path) -> Recovery:
    from recoup.recover.hard_prompt import HardPrompt

    return HardPrompt.load(path)


def _lora(path: Path) -> Recovery:
    """A PEFT LoRA directory; CPET saves one too, with ``"method": "cpet"`` in its record."""
    from recoup.recover.cpet import CpetRecovery
    from recoup.recover.lora import LoraRecovery

    record = path / RECORD
    if record.is_file() and json.loads(record.read_text()).get("method") == "cpet":
        return CpetRecovery.load(path)
    return LoraRecovery.load(path)


def _register_builtin() -> None:
    LOADERS.register("soft-prompt", _soft_prompt)
    LOADERS.register("idp", _idp)
    LOADERS.register("hard-prompt", _hard_prompt)
    LOADERS.register("lora", _lora)
    LOADERS.register("cpet", _lora)
    PEFT_TYPES["LORA"] = "lora"


_register_builtin()


def saved_method(path: str | Path) -> str:
    """The method name of the recovery saved in ``path`` (one clear line when it is not one)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise RecoupError(f"no recovery directory at '{path}'")
    try:
        if (folder / PEFT_CONFIG).is_file():
            peft_type = json.loads((folder / PEFT_CONFIG).read_text()).get("peft_type")
            if peft_type not in PEFT_TYPES:
                raise RecoupError(f"'{path}' holds a PEFT adapter of type {peft_type}, which recoup cannot attach; "
                                  f"supported: {', '.join(sorted(PEFT_TYPES))}")
            return PEFT_TYPES[peft_type]
        if (folder / RECORD).is_file():
            method = json.loads((folder / RECORD).read_text()).get("method")
            if not isinstance(method, str):
                raise RecoupError(f"'{folder / RECORD}' names no \"method\"")
            return method
    except json.JSONDecodeError as exc:
        raise RecoupError(f"'{path}': corrupt recovery metadata ({exc})") from None
    raise RecoupError(f"'{path}' is not a saved recovery: it has neither {PEFT_CONFIG} nor {RECORD}")


def load_recovery(path: str | Path) -> Recovery:
    """The recovery saved in ``path``, ready to attach (``Recovery.apply`` / ``Recovery.prefix``)."""
    folder = Path(path).expanduser()
    return LOADERS.get(saved_method(folder))(folder)
