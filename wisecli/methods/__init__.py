"""Editing methods behind one seam (``base.Method``); the registry maps a manifest's
``method`` to its implementation."""
from __future__ import annotations

from wisecli.errors import ConfigError
from wisecli.methods.base import Method

DEFAULT = "wise"


def registry() -> dict[str, Method]:
    """Every method wise offers, by the name a manifest records (imported on first use)."""
    from wisecli.methods.ultraedit.method import ULTRAEDIT
    from wisecli.methods.wise.method import WISE
    return {WISE.name: WISE, ULTRAEDIT.name: ULTRAEDIT}


def get(name: str | None) -> Method:
    methods = registry()
    method = methods.get(name or DEFAULT)
    if method is None:
        raise ConfigError(f"unknown editing method {name!r}", hint=f"one of: {', '.join(sorted(methods))}")
    return method
