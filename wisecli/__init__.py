"""wise: lifelong knowledge edits for LLM checkpoints.

The Python API is ``wisecli.load``, ``wisecli.edit`` and ``wisecli.evaluate`` (``api.py``),
imported on first use so that ``wise --version`` does not load torch.
"""
from typing import Any

__version__ = "0.14.0"
__all__ = ["load", "edit", "evaluate", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("load", "edit", "evaluate"):
        from wisecli.app import api
        return getattr(api, name)
    raise AttributeError(f"module 'wisecli' has no attribute {name!r}")
