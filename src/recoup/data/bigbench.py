"""BIG-bench task files (qa_wikidata for factoid QA, gem/xsum for summarization): an optional source.

The package index no longer serves ``bigbench==1.0.0`` (only a placeholder 0.0.1 without task files), so these
two tasks read files a user already has. ``recoup setup`` installs them into ``$RECOUP_HOME/data/bigbench/``
from the first source that works:

1. ``$RECOUP_BIGBENCH_DIR``: a BIG-bench checkout, its ``bigbench/benchmark_tasks`` folder, or the
   ``bigbench-1.0.0.tar.gz`` sdist itself;
2. ``pip download --no-deps --no-binary :all: bigbench==1.0.0``, i.e. the user's package index, mirror, proxy
   and certificates (never a hard-coded file host).

The sdist is accepted only with the 1.0.0 release's sha256. Loose task files are checked against the release's
example counts (qa_wikidata 20442, xsum 1001) and must parse; each installed file's sha256 is recorded beside it
(``SOURCE.json``) and in every result's protocol, so a score says exactly which file it came from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from recoup.errors import MissingData, RecoupError
from recoup.paths import recoup_home

log = logging.getLogger(__name__)

REQUIREMENT = "bigbench==1.0.0"
SDIST_NAME = "bigbench-1.0.0.tar.gz"
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
ENV_DIR = "RECOUP_BIGBENCH_DIR"
# task name -> its task.json below ``benchmark_tasks/``
TASK_FILES = {"qa_wikidata": "qa_wikidata/task.json", "xsum": "gem/xsum/task.json"}
# examples in the 1.0.0 release's task files (a file with another count is another version)
EXAMPLES = {"qa_wikidata": 20442, "xsum": 1001}
HOW = (
    f"set {ENV_DIR} to a BIG-bench checkout, its benchmark_tasks folder or the {SDIST_NAME} sdist, then run "
    f"`recoup setup`"
)


def bigbench_dir() -> Path:
    return recoup_home() / "data" / "bigbench"


def task_path(task: str) -> Path:
    return bigbench_dir() / task / "task.json"


def installed() -> bool:
    return all(task_path(t).is_file() for t in TASK_FILES)


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _check_task(task: str, data: bytes, where: str) -> None:
    """The bytes must be the release's task file: valid JSON with its ``examples`` (input, target) and count."""
    try:
        parsed = json.loads(data)
        examples = parsed["examples"]
        ok = all("input" in e and "target" in e for e in examples[:50])
    except (ValueError, KeyError, TypeError):
        raise RecoupError(f"{where} is not a BIG-bench task.json (no examples with input and target)") from None
    if not ok:
        raise RecoupError(f"{where} is not a BIG-bench task.json (examples lack input/target)")
    if len(examples) != EXAMPLES[task]:
        raise RecoupError(
            f"{where} has {len(examples)} examples, the bigbench 1.0.0 release's {task} has "
            f"{EXAMPLES[task]}: another version of the task; use the 1.0.0 files"
        )


def _install(by_task: dict[str, bytes], origin: str) -> None:
    """Write checked task files atomically, each with a record of its origin and digest."""
    for task, data in by_task.items():
        out = task_path(task)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".partial")
        tmp.write_bytes(data)
        os.replace(tmp, out)
        record = {"task": task, "origin": origin, "sha256": _sha256_bytes(data), "examples": EXAMPLES[task]}
        (out.parent / "SOURCE.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info("bigbench task files in %s (from %s)", bigbench_dir(), origin)


def extract(sdist: Path, sha256: str = SDIST_SHA256) -> None:
    """Verify the sdist's digest and install the task files it holds."""
    digest = _sha256(sdist)
    if digest != sha256:
        raise RecoupError(
            f"{sdist} has sha256 {digest[:16]}..., expected {sha256[:16]}...: not the {SDIST_NAME} "
            f"release (a corrupt or other download?)"
        )
    wanted = {f"bigbench-1.0.0/bigbench/benchmark_tasks/{inner}": task for task, inner in TASK_FILES.items()}
    found: dict[str, bytes] = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            if member.name in wanted and member.isfile():
                found[wanted[member.name]] = tar.extractfile(member).read()
                if len(found) == len(wanted):
                    break
    missing = [inner for inner, task in wanted.items() if task not in found]
    if missing:
        raise RecoupError(f"{missing[0]} is missing from {sdist}")
    for task, data in found.items():
        _check_task(task, data, f"{sdist}:{TASK_FILES[task]}")
    _install(found, f"sdist {sdist.name} (sha256 {digest})")


def _tasks_root(path: Path) -> Path | None:
    """The ``benchmark_tasks`` folder in or at ``path`` (a checkout, its ``bigbench`` package, or the folder)."""
    for root in (path, path / "benchmark_tasks", path / "bigbench" / "benchmark_tasks"):
        if all((root / inner).is_file() for inner in TASK_FILES.values()):
            return root
    return None


def install_from(path: Path) -> None:
    """Install from a sdist file or a folder holding the task files (see the module docstring)."""
    path = path.expanduser()
    if path.is_file():
        extract(path)
        return
    if not path.is_dir():
        raise RecoupError(f"{ENV_DIR}={path}: no such file or folder")
    root = _tasks_root(path)
    if root is None:
        raise RecoupError(
            f"{ENV_DIR}={path} holds no {' and no '.join(TASK_FILES.values())} (looked in it, "
            f"benchmark_tasks/ and bigbench/benchmark_tasks/)"
        )
    by_task = {task: (root / inner).read_bytes() for task, inner in TASK_FILES.items()}
    for task, data in by_task.items():
        _check_task(task, data, str(root / TASK_FILES[task]))
    _install(by_task, f"folder {root}")


def pip_download(dest: Path) -> Path:
    """The sdist through pip (the user's index and settings); RecoupError with pip's own last line if it fails."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--no-build-isolation",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(dest),
        REQUIREMENT,
    ]
    log.info("trying %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sdist = dest / SDIST_NAME
    if proc.returncode != 0 or not sdist.is_file():
        lines = [
            ln.strip()
            for ln in (proc.stderr or proc.stdout or "").splitlines()
            if ln.strip() and not ln.startswith("WARNING")
        ]
        reason = lines[-1] if lines else f"pip exit {proc.returncode}"
        raise MissingData(f"the package index does not serve {REQUIREMENT} ({reason.removeprefix('ERROR: ')})")
    return sdist


def install() -> None:
    """Install the task files from ``$RECOUP_BIGBENCH_DIR``, else through pip; MissingData says how otherwise."""
    local = os.environ.get(ENV_DIR)
    if local:
        install_from(Path(local))
        return
    with tempfile.TemporaryDirectory() as tmp:
        try:
            sdist = pip_download(Path(tmp))
        except MissingData as exc:
            raise MissingData(f"{exc}; {HOW}") from None
        extract(sdist)


def require_task(task: str) -> Path:
    path = task_path(task)
    if not path.is_file():
        raise MissingData(f"task '{task}' reads BIG-bench's {TASK_FILES[task]}, which is not installed: {HOW}")
    return path


def task_sha256(task: str) -> str:
    """The installed task file's sha256 (for the result protocol)."""
    return _sha256(require_task(task))


def load_task(task: str) -> dict[str, Any]:
    """The parsed task.json of ``task`` (``examples``: ``{"input", "target"}`` with target a str or list)."""
    with open(require_task(task), encoding="utf-8") as fh:
        return json.load(fh)
