"""The recovery-method registry (one line per method) and loading a saved recovery, whatever the method.

A new method is one file that defines ``METHOD = RecoveryMethod(...)`` (:mod:`recoup.recover.base`) and
one line below (or ``RECOVERIES.register(name, method)`` from your own code): ``recoup recover``, recipe
``recover:`` steps, ``recoup compare-recovery --recovery LABEL=DIR`` and Python then all know it.

A saved directory names its method in ``recoup_recovery.json`` (``{"method": ...}``); a plain PEFT
directory (``adapter_config.json`` only) is matched by its ``peft_type`` to the first method saving that layout.
"""

from __future__ import annotations

import json
from pathlib import Path

from recoup.errors import RecoupError
from recoup.model.recovery import PEFT_CONFIG, RECOVERY_RECORD, TRAIN_RECORD, Recovery
from recoup.recover import cpet, eora, hard_prompt, idp, lora, soft_prompt, tune
from recoup.recover.base import RecoveryMethod
from recoup.registry import Registry

RECOVERIES: Registry[RecoveryMethod] = Registry("recovery method")
for _mod in (hard_prompt, soft_prompt, idp, lora, cpet, eora, tune):
    RECOVERIES.register(_mod.METHOD.name, _mod.METHOD)


def _record_method(path: Path) -> str | None:
    if not path.is_file():
        return None
    method = json.loads(path.read_text()).get("method")
    if not isinstance(method, str):
        raise RecoupError(f"'{path}' names no \"method\"")
    return method


def saved_method(path: str | Path) -> str:
    """The method name of the recovery saved in ``path`` (one clear line when it is not one)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise RecoupError(f"no recovery directory at '{path}'")
    try:
        method = _record_method(folder / RECOVERY_RECORD)
        if method is not None:
            return method
        if (folder / PEFT_CONFIG).is_file():
            peft_type = json.loads((folder / PEFT_CONFIG).read_text()).get("peft_type")
            for name in RECOVERIES.names():
                if RECOVERIES.get(name).peft_type == peft_type:
                    return name
            known = sorted({RECOVERIES.get(n).peft_type for n in RECOVERIES.names()} - {None})
            raise RecoupError(
                f"'{path}' holds a PEFT adapter of type {peft_type}, which recoup cannot attach; "
                f"supported: {', '.join(known)}"
            )
        method = _record_method(folder / TRAIN_RECORD)
        if method is not None:
            return method
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise RecoupError(f"'{path}': corrupt recovery metadata ({type(exc).__name__})") from None
    raise RecoupError(f"'{path}' is not a saved recovery: it has neither {PEFT_CONFIG} nor {RECOVERY_RECORD}")


def load_recovery(path: str | Path) -> Recovery:
    """The recovery saved in ``path``, ready to attach (``Recovery.apply`` / ``Recovery.prefix``)."""
    from recoup.model.load import check_finite_files

    folder = Path(path).expanduser()
    method = saved_method(folder)
    check_finite_files(folder, f"recovery '{path}'")  # a NaN prompt/adapter would score nan silently
    return RECOVERIES.get(method).load(folder)


__all__ = ["RECOVERIES", "RecoveryMethod", "load_recovery", "saved_method"]
