"""The recovery room's shape: a method is one module that imports no other method module (what methods share
lives in shared modules: base, adapter, prompt, losses, train, task_data), and only the registry imports them."""

from __future__ import annotations

import ast
from pathlib import Path

import recoup.recover

ROOM = Path(recoup.recover.__file__).parent
REGISTRY = "methods"


def _defines_method(tree: ast.Module) -> bool:
    return any(
        isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "METHOD" for t in node.targets)
        for node in tree.body
    )


def _recover_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, module name inside recoup.recover) of every import, lazy ones inside functions included."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "recoup.recover":
                found += [(node.lineno, a.name) for a in node.names]
            elif node.module.startswith("recoup.recover."):
                found.append((node.lineno, node.module.split(".")[2]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[2]) for a in node.names if a.name.startswith("recoup.recover.")]
    return found


def test_no_module_but_the_registry_imports_a_method_module():
    trees = {p.stem: ast.parse(p.read_text(encoding="utf-8")) for p in sorted(ROOM.glob("*.py"))}
    methods = {name for name, tree in trees.items() if _defines_method(tree)}
    assert {"lora", "eora", "cpet", "soft_prompt", "idp", "hard_prompt"} <= methods  # the check sees the methods
    bad = [
        f"recover/{name}.py:{line} imports method module {target}"
        for name, tree in trees.items()
        if name != REGISTRY
        for line, target in _recover_imports(tree)
        if target in methods and target != name
    ]
    assert not bad, "\n".join(bad)


def test_the_registry_names_every_method_module():
    from recoup.recover.methods import RECOVERIES

    modules = {RECOVERIES.get(n).fit.__module__.rsplit(".", 1)[1] for n in RECOVERIES.names()}
    defined = {p.stem for p in ROOM.glob("*.py") if _defines_method(ast.parse(p.read_text(encoding="utf-8")))}
    assert modules == defined
