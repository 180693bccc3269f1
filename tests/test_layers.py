"""Imports run downward only (the rule in recoup's package docstring), checked with ``ast`` over src/."""

from __future__ import annotations

import ast
from pathlib import Path

import recoup

SRC = Path(recoup.__file__).parent
LAYER = {
    "errors": 0,
    "safeio": 0,
    "blocks": 0,
    "memory": 0,
    "config": 0,
    "registry": 0,
    "paths": 0,
    "overrides": 0,
    "version": 0,
    "model": 1,
    "data": 1,
    "artifact": 2,
    "compress": 3,
    "recover": 3,
    "evaluate": 3,
    "recipe": 4,
    "runs": 5,
    "commands": 6,
    "cli": 6,
    "setup": 6,
    "__init__": 6,
    "__main__": 6,
    "integrations": 6,
}
PEERS = {"compress", "recover", "evaluate"}


def _room(parts: list[str]) -> str:
    return parts[0] if parts and not parts[0].startswith("__") or parts[:1] == ["__main__"] else "__init__"


def _imports(path: Path) -> list[tuple[int, list[str]]]:
    rel = path.relative_to(SRC).with_suffix("").parts
    here = list(rel[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[1:]) for a in node.names if a.name.split(".")[0] == "recoup"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                mod = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "recoup":
                mod = node.module.split(".")[1:]
            else:
                continue
            found += [(node.lineno, [a.name]) for a in node.names] if not mod else [(node.lineno, mod)]
    return found


def test_every_module_has_a_layer_and_imports_run_downward():
    bad, unplaced = [], set()
    for path in sorted(SRC.rglob("*.py")):
        me = _room(list(path.relative_to(SRC).with_suffix("").parts))
        if me not in LAYER:
            unplaced.add(me)
            continue
        for line, target in _imports(path):
            to = _room(target)
            if to == me or to not in LAYER:
                continue
            if LAYER[to] > LAYER[me] or (me in PEERS and to in PEERS):
                bad.append(f"{path.relative_to(SRC)}:{line} {me} -> {'.'.join(target)}")
    assert not unplaced, f"rooms with no layer: {sorted(unplaced)}"
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_the_rule_is_stated_in_the_package_docstring():
    for room in ("artifact", "compress", "recover", "evaluate", "recipe", "runs", "commands"):
        assert room in recoup.__doc__
