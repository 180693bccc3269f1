"""``--set key=value`` overrides of a nested mapping (a recipe as loaded from YAML, before validation).

Keys are dotted (``evaluate.limit``); list items (recipe steps) are addressed by their ``name`` or by
index (``compress.8x.sparsity``, ``compress.0.sparsity``); values are parsed as YAML scalars / lists.
"""

from __future__ import annotations

from typing import Any

import yaml

from recoup.errors import RecoupError


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (['a','b','c'], value parsed as YAML: numbers, true/false, null, lists)."""
    if "=" not in text:
        raise RecoupError(f"--set expects key=value (got '{text}'), e.g. --set evaluate.limit=4")
    key, value = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise RecoupError(f"--set: bad key '{key}'; write dotted keys like compress.8x.sparsity")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return parts, parsed


def apply_override(raw: dict, parts: list[str], value: Any) -> None:
    """Set ``raw[parts...] = value``; list items are addressed by index or by their ``name``."""
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            idx = next((j for j, s in enumerate(node) if isinstance(s, dict) and s.get("name") == part), None)
            if idx is None and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
                idx = int(part)
            if idx is None:
                names = [s.get("name") for s in node if isinstance(s, dict)]
                raise RecoupError(f"--set {where}: no step '{part}' (steps: {', '.join(map(str, names))})")
            if last:
                node[idx] = value
            else:
                node = node[idx]
            continue
        if not isinstance(node, dict):
            raise RecoupError(f"--set {where}: '{'.'.join(parts[:i])}' is not a mapping")
        if last:
            node[part] = value
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
