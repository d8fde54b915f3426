"""The layer rule of DESIGN.md, checked on the import statements of every module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "crdtswarm"

# Lower number = lower layer. A module may import only from its own layer and below.
LAYERS: dict[str, int] = {
    "crdtswarm.errors": 0,
    "crdtswarm.identity": 0,
    "crdtswarm.log": 0,
    "crdtswarm.protocol": 1,
    "crdtswarm.sync.protocol": 2,
    "crdtswarm.transport": 3,
    "crdtswarm.secure": 4,
    "crdtswarm.mux": 4,
    "crdtswarm.signaling": 4,
    "crdtswarm.peer": 5,
    "crdtswarm.rpc": 5,
    "crdtswarm.relay": 5,
    "crdtswarm.mesh": 5,
    "crdtswarm.routing": 5,
    "crdtswarm.signals": 5,
    "crdtswarm.sync": 5,
    "crdtswarm.swarm": 6,
    "crdtswarm.testing": 7,
    "crdtswarm.cli": 7,
    "crdtswarm": 7,
}
SANS_IO = ("crdtswarm.protocol", "crdtswarm.sync.protocol")
FORBIDDEN_IN_SANS_IO = ("anyio", "asyncio", "aiortc", "aioice", "socket", "trio", "selectors")


def layer_of(module: str) -> int:
    best = max(
        (name for name in LAYERS if module == name or module.startswith(name + ".")), key=len
    )
    return LAYERS[best]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found.extend(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: use absolute imports")
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_layer_rule(path: Path) -> None:
    name = module_name(path)
    own = layer_of(name)
    for imported in imports_of(path):
        if not imported.startswith("crdtswarm"):
            continue
        if imported.rsplit(".", 1)[0] == "crdtswarm" and imported != "crdtswarm":
            # "from crdtswarm import x" where x is a submodule
            pass
        assert layer_of(imported) <= own or imported == name, (
            f"{name} (layer {own}) imports {imported} (layer {layer_of(imported)})"
        )


@pytest.mark.parametrize(
    "path",
    [p for p in MODULES if module_name(p).startswith(SANS_IO)],
    ids=lambda p: module_name(p),
)
def test_sans_io_cores_import_no_io(path: Path) -> None:
    for imported in imports_of(path):
        root = imported.split(".")[0]
        assert root not in FORBIDDEN_IN_SANS_IO, f"{module_name(path)} imports {imported}"


def test_the_rule_catches_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import anyio\nfrom crdtswarm.swarm import Swarm\n")
    assert imports_of(bad) == ["anyio", "crdtswarm.swarm", "crdtswarm.swarm.Swarm"]
    assert layer_of("crdtswarm.swarm") > layer_of("crdtswarm.protocol.mux")
