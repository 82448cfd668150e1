"""Where wise keeps what it caches: converted models, file hashes, write locks."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$WISE_CACHE``, else ``$XDG_CACHE_HOME/wise``, else ``~/.cache/wise``.

    Read on every call (not at import) so tests and users can redirect it.
    """
    if os.environ.get("WISE_CACHE"):
        return Path(os.environ["WISE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "wise"
    return Path.home() / ".cache" / "wise"
