"""Replacing a checkpoint survives a kill at every step, a full disk and a second writer.

Kills are injected with the ``WISE_CRASH_AT`` hook (``wisecli/atomic.py``) in a real child
process, which then dies with ``os._exit`` exactly there; the parent checks what is left.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from wisecli.app import checkpoint as ck
from wisecli.errors import OutputExistsError

from cli_support import env, error_line, files, leftovers, run_script  # noqa: F401  (fixtures)
from test_checkpoint import base, manifest, tensors  # noqa: F401  (the fake base and its manifest)

WRITE = """
import sys, json
from pathlib import Path
from wisecli.app import atomic, checkpoint as ck
sys.path.insert(0, {tests!r})
from test_checkpoint import manifest, tensors
if {no_exchange!r}:
    atomic._exchange = lambda a, b: False
ck.write_checkpoint(Path({out!r}), base_dir=Path({base!r}), tensors=tensors(),
                    manifest={{**manifest(), "n": 2}}, force=True)
"""


def _write_in_child(base: Path, out: Path, crash_at: str | None, no_exchange: bool = False) -> int:
    script = WRITE.format(tests=str(Path(__file__).parent), no_exchange=no_exchange, out=str(out), base=str(base))
    env = {**os.environ, **({"WISE_CRASH_AT": crash_at} if crash_at else {})}
    return subprocess.run([sys.executable, "-c", script], env=env, timeout=120).returncode


@pytest.mark.parametrize("point,want", [("built", 1), ("swapped", 2)])
def test_a_kill_during_the_swap_leaves_the_old_or_the_new_checkpoint(base, tmp_path, wise_cache, point, want):
    out = tmp_path / "p"
    ck.write_checkpoint(out, base_dir=base, tensors=tensors(), manifest={**manifest(), "n": 1})
    assert _write_in_child(base, out, point) == 137
    assert ck.read_checkpoint(out).manifest["n"] == want  # never missing, never half-written
    assert _write_in_child(base, out, None) == 0  # the next writer cleans up what the killed one left
    assert ck.read_checkpoint(out).manifest["n"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_without_renameat2_the_next_writer_rolls_an_interrupted_swap_back(base, tmp_path, wise_cache):
    out = tmp_path / "p"
    ck.write_checkpoint(out, base_dir=base, tensors=tensors(), manifest={**manifest(), "n": 1})
    assert _write_in_child(base, out, "old-moved", no_exchange=True) == 137
    assert not out.exists() and list(tmp_path.glob(".p.old-*"))  # the window two renames leave
    ck.write_checkpoint(out, base_dir=base, tensors=tensors(), manifest={**manifest(), "n": 3}, force=True)
    assert ck.read_checkpoint(out).manifest["n"] == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_two_writers_of_one_output_one_wins_the_other_is_told(base, tmp_path, wise_cache):
    out = tmp_path / "p"
    start, errors = threading.Barrier(2), []

    def write(n: int) -> None:
        start.wait()
        try:
            ck.write_checkpoint(out, base_dir=base, tensors=tensors(), manifest={**manifest(), "n": n})
        except OutputExistsError as exc:
            errors.append(str(exc))
    threads = [threading.Thread(target=write, args=(n,)) for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 1 and "already exists" in errors[0]
    assert ck.read_checkpoint(out).manifest["n"] in (1, 2)


def test_a_full_disk_is_a_one_line_error_and_leaves_nothing(tmp_path, files, tiny_llama_dir, env):
    out = tmp_path / "out"

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
    wise = str(Path(sys.executable).parent / "wise")
    res = subprocess.run([wise, "edit", str(tiny_llama_dir), str(files["edits"]), "-o", str(out), "--config",
                          str(files["config"]), "--no-eval"], capture_output=True, text=True, timeout=300,
                         preexec_fn=small_files)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "disk is full or a file-size limit" in error_line(res.stderr)
    assert not leftovers(tmp_path, "out")
