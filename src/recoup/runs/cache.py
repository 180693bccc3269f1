"""Content-addressed stage outputs: a stage's key hashes its inputs; its directory appears atomically.

Key = sha256 of (stage kind, its recipe slice, the keys of the stages it reads, the model's
fingerprint, the hash of the code the stage kind runs). Output lives in
``RUN_DIR/stages/NAME-KEY12/``; a stage writes into ``NAME-KEY12.partial-PID`` and renames it at the
end, after ``result.json``, so a directory without the ``.partial`` suffix is always complete and a
killed stage leaves only a partial directory that the next run removes and redoes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from recoup.model.load import BUNDLED_ALIAS, bundled_model_dir, model_fingerprint, resolve_source
from recoup.safeio import dumps
from recoup.version import __version__

log = logging.getLogger(__name__)

RESULT = "result.json"


@functools.lru_cache(maxsize=None)
def code_version(parts: tuple[str, ...], root: Path | None = None) -> str:
    """sha256 over recoup's version and the source files under the given sub-paths of ``root`` (the package)."""
    root = Path(__file__).resolve().parents[1] if root is None else root
    h = hashlib.sha256(__version__.encode())
    for part in parts:
        target = root / part
        files = sorted(target.rglob("*.py")) if target.is_dir() else [target] if target.is_file() else []
        for f in files:
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def source_fingerprint(source: str) -> str:
    """Fingerprint of a model source: a hash of its weights and config when local, else its id."""
    if source == BUNDLED_ALIAS:
        resolve_source(source)  # converts once if needed
        return f"{BUNDLED_ALIAS}:{model_fingerprint(bundled_model_dir())}"
    path = Path(source).expanduser()
    if path.is_dir():
        return f"dir:{model_fingerprint(path)}"
    if path.is_file():
        from recoup.model.load import file_sha256

        return f"file:{file_sha256(path)}"
    return f"hub:{source}"


def stage_key(kind: str, params: dict, needs: dict[str, str], code: str) -> str:
    """The cache key of a stage (hex sha256)."""
    blob = json.dumps({"kind": kind, "params": params, "needs": needs, "code": code}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def stage_dir(run_dir: Path, name: str, key: str) -> Path:
    return Path(run_dir) / "stages" / f"{safe_name(name)}-{key[:12]}"


def read_result(folder: Path) -> dict | None:
    """The finished stage's result, or None when the stage has not finished."""
    f = Path(folder) / RESULT
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:  # cannot happen with the rename protocol, but never trust a torn file
        log.warning("unreadable %s; the stage will be redone", f)
        return None


def begin(final: Path) -> Path:
    """A fresh partial directory for ``final``; leftovers of killed attempts are removed first."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for old in final.parent.glob(final.name + ".partial-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue  # another live process is working on it
        log.info("removing the leftover of an interrupted attempt: %s", old.name)
        shutil.rmtree(old, ignore_errors=True)
    tmp = final.parent / f"{final.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, final: Path, result: dict) -> None:
    """Write ``result.json`` (fsynced) into ``tmp`` and rename ``tmp`` to ``final`` atomically."""
    data = dumps(result, indent=1).encode()
    with open(tmp / RESULT, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    if final.exists():  # a concurrent process finished the same stage first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        return
    os.replace(tmp, final)
    try:
        dfd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
