"""Imports go down the layers only: platforms never reach up into the orchestrator."""

from __future__ import annotations

import ast
from pathlib import Path

import harness

# cli -> run -> platform/ -> tracing, progress, metrics -> results, vm, spec, image
#     -> trace, host, guest (docs/ARCHITECTURE.md). A module may import its own layer.
LAYERS: dict[str, int] = {
    "harness.cli": 0,
    "harness.run": 1,
    "harness.analysis": 1,  # reads result files only: results, trace models, nothing live
    "harness.preview": 1,
    "harness.platform": 2,
    "harness.tracing": 3,
    "harness.progress": 3,
    "harness.metrics": 3,
    "harness.runstate": 3,
    "harness.results": 4,
    "harness.vm": 4,
    "harness.spec": 4,
    "harness.image": 4,
    "harness.trace": 5,
    "harness.host": 5,
    "harness.guest": 5,
    "harness.paths": 5,
}


def layer(module: str) -> int | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if (name := ".".join(parts[:n])) in LAYERS:
            return LAYERS[name]
    return None


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("harness.")}


def test_no_module_imports_a_layer_above_its_own() -> None:
    root = Path(harness.__file__).parent
    checked = 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        module = ".".join(p for p in rel.parts if p != "__init__")
        own = layer(module)
        if own is None:
            continue  # not in the table
        checked += 1
        for imported in imports(path):
            other = layer(imported)
            assert other is None or other >= own, f"{module} (layer {own}) imports {imported}"
    assert checked > 30
