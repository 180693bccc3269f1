"""BIG-bench task files read out of the ``bigbench==1.0.0`` sdist, which is never pip-installed.

``pip download bigbench`` fails on the sdist's metadata, so ``recoup setup`` fetches the sdist itself
from the package index with urllib, checks its sha256 and extracts only the task.json files recoup
reads (qa_wikidata for factoid QA, gem/xsum for summarization) into ``$RECOUP_HOME/data/bigbench/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from recoup.errors import RecoupError
from recoup.paths import recoup_home

log = logging.getLogger(__name__)

SDIST_URL = ("https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/"
             "bigbench-1.0.0.tar.gz")
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
# task name -> path of its task.json inside the sdist
TASK_FILES = {"qa_wikidata": "bigbench-1.0.0/bigbench/benchmark_tasks/qa_wikidata/task.json",
              "xsum": "bigbench-1.0.0/bigbench/benchmark_tasks/gem/xsum/task.json"}
SETUP_STEP = "bigbench task files (qa_wikidata, xsum)"


def bigbench_dir() -> Path:
    return recoup_home() / "data" / "bigbench"


def task_path(task: str) -> Path:
    return bigbench_dir() / task / "task.json"


def installed() -> bool:
    return all(task_path(t).is_file() for t in TASK_FILES)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def extract(sdist: Path, sha256: str = SDIST_SHA256) -> None:
    """Verify ``sdist`` and copy the needed task.json files into :func:`bigbench_dir` (atomically per file)."""
    digest = _sha256(sdist)
    if digest != sha256:
        raise RecoupError(f"{sdist} has sha256 {digest[:16]}..., expected {sha256[:16]}...: not the bigbench 1.0.0 "
                          f"sdist (a corrupt download?); delete it and run `recoup setup` again")
    with tarfile.open(sdist, "r:gz") as tar:
        wanted = set(TASK_FILES.values())
        found = {}
        for member in tar:
            if member.name in wanted and member.isfile():
                found[member.name] = tar.extractfile(member).read()
                if len(found) == len(wanted):
                    break
    for task, inner in TASK_FILES.items():
        if inner not in found:
            raise RecoupError(f"{inner} is missing from {sdist}")
        data = found[inner]
        json.loads(data)  # it must parse before it is installed
        out = task_path(task)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".partial")
        tmp.write_bytes(data)
        os.replace(tmp, out)
    log.info("bigbench task files in %s", bigbench_dir())


def download_and_extract(url: str = SDIST_URL, sha256: str = SDIST_SHA256) -> None:
    """Fetch the sdist (about 360 MB) to a temporary file, verify it, extract the task files, delete it.

    ``$RECOUP_BIGBENCH_SDIST`` may name an already downloaded copy of the sdist (it is verified the same way).
    """
    local = os.environ.get("RECOUP_BIGBENCH_SDIST")
    if local:
        extract(Path(local).expanduser(), sha256)
        return
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "bigbench-1.0.0.tar.gz"
        log.info("downloading %s", url)
        try:
            with urllib.request.urlopen(url, timeout=60) as resp, open(target, "wb") as fh:
                shutil.copyfileobj(resp, fh, 1 << 22)
        except OSError as exc:
            raise RecoupError(f"could not download the bigbench sdist from {url} ({exc}); check the network to "
                              f"the package index") from None
        extract(target, sha256)


def require_task(task: str) -> Path:
    path = task_path(task)
    if not path.is_file():
        raise RecoupError(f"bigbench task '{task}' is not installed; run `recoup setup` (it fetches the bigbench "
                          f"1.0.0 sdist and extracts {TASK_FILES[task].split('benchmark_tasks/')[1]})")
    return path


def load_task(task: str) -> dict[str, Any]:
    """The parsed task.json of ``task`` (``examples``: ``{"input", "target"}`` with target a str or list)."""
    with open(require_task(task), encoding="utf-8") as fh:
        return json.load(fh)
