"""SHA-256 of model files, and a cache of those hashes keyed by (path, size, mtime).

Checkpoints record the hashes of the base's files and are checked against them on every
load; a 500 MB weight file takes about a second to hash, so a hash is reused while the
file is unchanged.  The cache lives in wise's cache directory and only ever saves time.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from wisecli.app.paths import cache_dir

_BLOCK = 1 << 20
# A file hashed within this long of its last change could change again without its
# mtime moving (timestamps are coarse), so such a hash is not cached: git's "racy clean" rule.
_RACY_NS = 2_000_000_000


def sha256_file(path: Path) -> str:
    """Hash in 1 MiB blocks so multi-GB weight files never sit in memory at once."""
    h = hashlib.sha256()
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _cache_file() -> Path:
    return cache_dir() / "hashes.json"


def _load_cache() -> dict[str, dict]:
    """The cache only saves time, so an unreadable or foreign one is treated as empty."""
    try:
        data = json.loads(_cache_file().read_text())
        entries = data.get("entries") if data.get("version") == 1 else None
        return entries if isinstance(entries, dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}


def _save_cache(entries: dict[str, dict]) -> None:
    """Replace atomically so concurrent runs never see a torn file; drop deleted paths
    so the cache does not grow forever.  Failure to write only costs a later rehash."""
    target = _cache_file()
    live = {p: e for p, e in entries.items() if os.path.exists(p)}
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".hashes.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"version": 1, "entries": live}, f)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError:
        pass


def _cached(entries: dict[str, dict], key: str, st: os.stat_result) -> str | None:
    e = entries.get(key)
    if (isinstance(e, dict) and e.get("size") == st.st_size
            and e.get("mtime_ns") == st.st_mtime_ns and isinstance(e.get("sha256"), str)):
        return e["sha256"]
    return None


def sha256_file_cached(path: Path) -> str:
    """Rehashing a 500 MB file costs ~1 s per load; reuse the hash while the file's
    (resolved path, size, mtime_ns) is unchanged."""
    path = Path(path).resolve()
    st = path.stat()
    entries = _load_cache()
    hit = _cached(entries, str(path), st)
    if hit is not None:
        return hit
    started = time.time_ns()
    digest = sha256_file(path)
    if started - st.st_mtime_ns >= _RACY_NS:
        entries[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        _save_cache(entries)
    return digest


def share_hash(src: Path, dst: Path) -> None:
    """A linked or copied weight file (same size and mtime) has its source's hash, so
    the first read of a fresh checkpoint need not hash it again."""
    entries = _load_cache()
    with contextlib.suppress(OSError):
        src, dst = src.resolve(), dst.resolve()
        st_src, st_dst = src.stat(), dst.stat()
        same = (st_src.st_size, st_src.st_mtime_ns) == (st_dst.st_size, st_dst.st_mtime_ns)
        if same and _cached(entries, str(src), st_src) is not None:
            entries[str(dst)] = dict(entries[str(src)])
            _save_cache(entries)
