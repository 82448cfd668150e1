"""The layers the folders name: ``runtime`` imports only torch, transformers, safetensors, the
standard library and itself (it is bundled into ``modeling_wise.py``); ``methods`` and the
shared modules never import the application; and no module imports one that imports it
back."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from wisecli.app.bundle import RUNTIME_IMPORTS, runtime_modules

PACKAGE = Path(__file__).resolve().parents[1] / "wisecli"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth of its code, absolute."""
    name = _module_name(path)
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)  # ``from pkg import module``
    return found


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {m: {i for i in _imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}
# The package's own ``from wisecli.app import api`` sits in ``__getattr__`` and runs on first use
# of ``wisecli.load`` / ``edit`` / ``evaluate``, never while a module is being imported.
GRAPH["wisecli"] -= {"wisecli.app", "wisecli.app.api"}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("wisecli.runtime")))
def test_the_runtime_imports_only_torch_transformers_safetensors_and_itself(module):
    for imported in _imports(MODULES[module]):
        top = imported.split(".")[0]
        allowed = top in RUNTIME_IMPORTS or top in sys.stdlib_module_names or top == "__future__" \
            or imported.startswith("wisecli.runtime.")
        assert allowed, f"{module} imports {imported}"


def test_every_runtime_module_is_bundled():
    assert set(runtime_modules()) == {m.rpartition(".")[2] for m in MODULES
                                      if m.startswith("wisecli.runtime.") and not m.endswith("__init__")}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.startswith("wisecli.app")))
def test_below_the_application_nothing_imports_it(module):
    """Methods, the runtime and the shared modules (errors, records, batching) get their
    configuration as values; only ``wisecli/__init__``'s lazy API reaches up."""
    if module == "wisecli":
        return
    assert not [i for i in GRAPH[module] if i.startswith("wisecli.app")], module


def test_no_import_circle():
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 2:
            return
        assert state.get(m) != 1, " -> ".join(path[path.index(m):] + [m])
        state[m] = 1
        for n in sorted(GRAPH[m]):
            visit(n, path + [m])
        state[m] = 2

    for m in sorted(GRAPH):
        visit(m, [])
