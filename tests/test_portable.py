"""Patch-only checkpoints that travel: the base is found again, and always verified first.

The recorded base path is relative to the checkpoint; when it is gone, ``--base`` names the
base, else the recorded alias or any cached model whose weights hash as recorded is used.
"""
from __future__ import annotations

import json
import shutil

import pytest

from cli_support import env, error_line, files, run_main  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def patch_only(tmp_path, files, tiny_llama_dir, monkeypatch, capsys):
    """A base of our own (copied, so it can be moved) and a patch-only checkpoint of it."""
    base = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_llama_dir, base)
    out = tmp_path / "work" / "patch"
    code, _, err = run_main(monkeypatch, capsys, "edit", base, files["edits"], "-o", out, "--config", files["config"],
                            "--patch-only", "--no-eval", "--json")
    assert code == 0, err
    return base, out


def _eval(monkeypatch, capsys, files, *args):
    return run_main(monkeypatch, capsys, "eval", *args, files["edits"], "--no-generate", "--json")


def test_moved_together_the_relative_path_still_finds_the_base(patch_only, files, tmp_path, monkeypatch, capsys):
    base, out = patch_only
    both = tmp_path / "moved"
    both.mkdir()
    shutil.move(str(base.parent), str(both / "models"))
    shutil.move(str(out.parent), str(both / "work"))
    code, out_json, err = _eval(monkeypatch, capsys, files, both / "work" / "patch")
    assert code == 0, err
    assert json.loads(out_json)["n_edits"] == 3


def test_a_moved_patch_needs_base_and_checks_it(patch_only, files, tmp_path, monkeypatch, capsys):
    base, out = patch_only
    moved = tmp_path / "far" / "away" / "patch"
    moved.parent.mkdir(parents=True)
    shutil.move(str(out), str(moved))
    print(sorted(p.name for p in moved.iterdir()))  # the closing note's file list
    code, _, err = _eval(monkeypatch, capsys, files, moved)
    line = error_line(err)
    assert code == 1 and "base model recorded" in line and "--base" in err
    code, out_json, err = _eval(monkeypatch, capsys, files, moved, "--base", base)
    assert code == 0, err
    # another model's weights are refused, by hash
    other = tmp_path / "other"
    shutil.copytree(base, other)
    weights = other / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    code, _, err = _eval(monkeypatch, capsys, files, moved, "--base", other)
    assert code == 1 and "SHA-256 does not match" in error_line(err)


def test_a_moved_patch_finds_its_base_in_the_model_cache_by_hash(patch_only, files, tmp_path, monkeypatch, capsys):
    base, out = patch_only
    cache = tmp_path / "cache"
    monkeypatch.setenv("WISE_CACHE", str(cache))
    (cache / "models").mkdir(parents=True)
    shutil.copytree(base, cache / "models" / "some-copy")
    shutil.rmtree(base)  # the recorded base is gone; a copy sits in wise's cache
    code, out_json, err = _eval(monkeypatch, capsys, files, out)
    assert code == 0, err
    code, info, err = run_main(monkeypatch, capsys, "info", out, "--json")
    assert code == 0 and json.loads(info)["base_dir"] == str(cache / "models" / "some-copy")


def test_base_is_only_for_patch_only_checkpoints(tiny_llama_dir, files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "embedded"
    code, _, err = run_main(monkeypatch, capsys, "edit", tiny_llama_dir, files["edits"], "-o", out, "--config",
                            files["config"], "--no-eval", "--json")
    assert code == 0, err
    code, _, err = _eval(monkeypatch, capsys, files, out, "--base", tiny_llama_dir)
    assert code == 1 and "--base is for --patch-only" in error_line(err)
    code, _, err = _eval(monkeypatch, capsys, files, tiny_llama_dir, "--base", tiny_llama_dir)
    assert code == 1 and "only a patched checkpoint takes a base" in error_line(err)
