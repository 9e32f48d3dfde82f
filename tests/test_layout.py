"""The package layout is the architecture: each role imports only the roles below it."""

from __future__ import annotations

import ast
import shutil
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


def violations(package: Path) -> list[str]:
    """Every import in `package` (a `sidecar` tree) that goes up a layer or sideways."""
    wrong = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).with_suffix("")
        module = ".".join(p for p in rel.parts if p != "__init__")
        own = layer_of(module) if module.count(".") >= 2 else TOP
        for imported in sorted(imports(path)):
            target = layer_of(imported)
            if imported == "sidecar" or target < 0:
                continue
            same_role = module.split(".")[:2] == imported.split(".")[:2]
            if target > own or (target == own and own != TOP and not same_role):
                wrong.append(f"{module} imports {imported}")
    return wrong


def test_every_import_flows_downwards() -> None:
    assert violations(PACKAGE) == []


def test_the_layering_rule_catches_an_upward_import(tmp_path: Path) -> None:
    """A copy of the real package, clean, then given one upward and one sideways import: the
    checker names exactly those two."""
    copy = tmp_path / "sidecar"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert violations(copy) == []
    with open(copy / "core" / "backoff.py", "a") as f:
        f.write("\nfrom sidecar.server.api import make_app  # noqa\n")
    with open(copy / "entitlement" / "state.py", "a") as f:
        f.write("\nimport sidecar.usage.hours\n")
    assert violations(copy) == [
        "sidecar.core.backoff imports sidecar.server.api",
        "sidecar.entitlement.state imports sidecar.usage.hours",
    ]
