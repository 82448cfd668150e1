"""Shared set-up of the CLI tests: temp cache, tiny config, one ``wise edit`` run, and the
helpers that run the CLI (in process through typer or ``main()``, or as the installed script).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wisecli.app.cli.main import app, main

from conftest import EDITS, MORE_EDITS, write_jsonl

WISE = str(Path(sys.executable).parent / "wise")
CONFIG = """\
max_steps: 10
min_steps: 5
n_prefixes: 2
n_negatives: 4
negative_lengths: [4]
negatives_per_step: 4
learning_rate: 0.05
mask_ratio: 0.5
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Hash cache in a temp dir (also for subprocesses) and one thread per subprocess."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WISE_CACHE", str(tmp_path_factory.mktemp("wise-cache")))
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.delenv("WISE_DEBUG", raising=False)
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory, env) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("inputs")
    cfg = d / "tiny.yaml"
    cfg.write_text(CONFIG)
    return {"edits": write_jsonl(d / "edits.jsonl", EDITS),
            "more": write_jsonl(d / "more.jsonl", MORE_EDITS), "config": cfg}


def invoke(*args: str) -> tuple[int, object]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result


def run_main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """``main()`` in process, as the ``wise`` script runs it: (exit code, stdout, stderr)."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["wise", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def run_script(*args, debug: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"WISE_DEBUG": "1"} if debug else {})}
    return subprocess.run([WISE, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def error_line(err: str) -> str:
    """The one error line: exactly one, and no traceback anywhere."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def leftovers(parent: Path, name: str) -> list[Path]:
    """The output directory or any temporary sibling of it."""
    return [p for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


@pytest.fixture(scope="module")
def patched(tmp_path_factory, files, tiny_llama_dir) -> tuple[Path, dict]:
    """One full ``wise edit`` run (weights embedded), shared by the read-only tests."""
    out = tmp_path_factory.mktemp("runs") / "patched"
    code, res = invoke("edit", tiny_llama_dir, files["edits"], "-o", out, "--config", files["config"],
                       "--json")
    assert code == 0, res.output
    return out, json.loads(res.stdout)
