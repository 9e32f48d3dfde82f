"""The package layout is the architecture: each role imports only the roles below it."""

from __future__ import annotations

import ast
from pathlib import Path

import sidecar

PACKAGE = Path(sidecar.__file__).parent
# Lower layers never import higher ones; the top-level modules (commands and wiring) may import all.
LAYERS = {"core": 0, "aws": 1, "emulator": 1, "entitlement": 2, "usage": 2, "ops": 3, "server": 4}
TOP = 9


def layer_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "sidecar":
        return -1  # not ours
    return LAYERS.get(parts[1], TOP) if len(parts) > 2 or parts[1] in LAYERS else TOP


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_every_import_flows_downwards() -> None:
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(p for p in rel.parts if p != "__init__")
        own = layer_of(module) if module.count(".") >= 2 else TOP
        for imported in imports(path):
            target = layer_of(imported)
            if imported == "sidecar" or target < 0:
                continue
            same_role = module.split(".")[:2] == imported.split(".")[:2]
            if target > own or (target == own and own != TOP and not same_role):
                wrong.append(f"{module} imports {imported}")
    assert wrong == []


def test_the_layering_rule_catches_an_upward_import(tmp_path: Path) -> None:
    assert layer_of("sidecar.core.backoff") < layer_of("sidecar.entitlement.state")
    assert layer_of("sidecar.config") == TOP
    assert layer_of("sidecar.server.api") > layer_of("sidecar.ops.metrics")
