"""Replacing an output directory so that a kill at any instant leaves the old one or the new one.

An output is built in a temporary sibling (``.OUT.tmp-*``) and swapped into place with one
``renameat2(RENAME_EXCHANGE)`` where Linux has it: before the exchange OUT is the old
directory, after it the new one, never neither.  Elsewhere two renames are used, and an
interrupted pair (OUT missing, ``.OUT.old-*`` present) is rolled back by the next writer.
Writers of one OUT take an exclusive lock, so a second one waits, then sees what the first
wrote; stale temporaries of killed writers are removed under that lock.

``WISE_CRASH_AT=<point>`` makes the process die at that point: the fault-injection tests'
hook (points: "built", "swapped", "old-moved").
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from wisecli.errors import WiseError
from wisecli.app.paths import cache_dir

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def crash_point(name: str) -> None:
    if os.environ.get("WISE_CRASH_AT") == name:
        os._exit(137)


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """An exclusive lock on writing ``out``, kept in wise's cache (nothing left beside OUT)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield
        return
    key = hashlib.sha256(os.fsencode(out.resolve())).hexdigest()[:32]
    locks = cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{key}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def recover(out: Path) -> None:
    """Finish what a killed writer left: put back an old OUT it had moved aside, and remove
    its temporaries.  Call only under ``locked(out)``."""
    olds = sorted(out.parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not (out.exists() or out.is_symlink()):
        os.rename(olds.pop(), out)
    for stale in olds + list(out.parent.glob(f".{out.name}.tmp-*")):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def building(out: Path) -> Iterator[Path]:
    """A fresh temporary sibling of ``out`` to build in (removed if building fails)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_in(tmp: Path, out: Path) -> None:
    """Make the built ``tmp`` the directory at ``out``; the old one, if any, is deleted."""
    crash_point("built")
    if not (out.exists() or out.is_symlink()):
        try:
            os.rename(tmp, out)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise WiseError(f"{out}: another process wrote it meanwhile; nothing was replaced") from None
            raise
        return
    if _exchange(tmp, out):
        crash_point("swapped")
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old directory
        return
    old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
    os.rename(out, old)
    crash_point("old-moved")
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # an old kernel, or a filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(b))
