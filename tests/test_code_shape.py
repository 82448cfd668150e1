"""What the code promises a maintainer: short functions, and the side-memory layer's state
changed only by its own methods."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "wisecli"
LIMIT = 60


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_function_is_longer_than_the_limit(path):
    long = [f"{f.name} ({f.end_lineno - f.lineno + 1} lines)" for f in _functions(path)
            if f.end_lineno - f.lineno + 1 > LIMIT]
    assert not long, f"{path.name}: {', '.join(long)}"


def test_only_the_layer_assigns_its_state():
    """No module but memory.py assigns an attribute of a side-memory layer (``mem.x = ...``
    or ``self.mem.x = ...``); routing settings go through ``configure``, tensors through the
    layer's methods."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")) + sorted((PACKAGE.parent / "benchmarks").rglob("*.py")):
        if path.name == "memory.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for t in targets:
                for leaf in ast.walk(t):
                    if isinstance(leaf, ast.Attribute) and _is_layer(leaf.value):
                        found.append(f"{path.name}:{leaf.lineno} .{leaf.attr}")
    assert not found, found


def _is_layer(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id == "mem") or \
        (isinstance(node, ast.Attribute) and node.attr == "mem")
