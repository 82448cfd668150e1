"""Patched-checkpoint format: round trip, verification, atomic and safe writes."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

from wisecli.app import atomic, checkpoint as ck, hashing
from wisecli.errors import CheckpointError, ModelError, OutputExistsError, WiseError

OLD_NS = 1_600_000_000 * 10**9  # an mtime safely in the past, so hashes may be cached


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WISE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def base(tmp_path) -> Path:
    d = tmp_path / "base"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (d / "tokenizer.json").write_text("{}")
    g = torch.Generator().manual_seed(0)
    safetensors.torch.save_file(
        {"w.a": torch.randn(4, 8, generator=g), "w.b": torch.randn(8, generator=g)},
        str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"side.0": torch.randn(8, 16, generator=g),
            "mask.0": torch.rand(8, 16, generator=g) > 0.5,
            "threshold": torch.tensor([0.25], dtype=torch.float64)}


def manifest() -> dict:
    """What wise edit hands write_checkpoint (it adds base.path/embedded/files and tensors)."""
    return {"method": "wise", "tool": {"name": "wise", "version": "0.2.0"},
            "base": {"origin": "tiny-test", "model_type": "llama"},
            "target": {"module_path": "model.layers.0.mlp.down_proj", "layer": 0, "n_layers": 1,
                       "kind": "linear", "in_features": 16, "out_features": 8},
            "mode": "merge", "config": {}, "router": {"scale": 1.0, "thresholds": [], "min_edit_scores": [],
                                                    "n_memories": 0},
            "editor": {}, "edits": [{"id": "a", "prompt": "p", "target_new": "t", "memory": 0}], "runs": [],
            "metrics": None}


def test_round_trip_bit_exact(base, tmp_path):
    out = tmp_path / "patched"
    m = manifest()
    ts = tensors()
    assert ck.write_checkpoint(out, base_dir=base, tensors=ts, manifest=m) == out
    assert m == manifest()  # caller's dict untouched
    assert ck.is_patched(out) and not ck.is_patched(base)
    assert {p.name for p in out.iterdir()} == {
        "config.json", "tokenizer.json", "model.safetensors", ck.WEIGHTS_NAME, ck.MANIFEST_NAME,
        "modeling_wise.py"}
    assert (out / "model.safetensors").read_bytes() == (base / "model.safetensors").read_bytes()
    # the base's config is nested, never at the top where a loader would take it for the base
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "wise_patched" and config["base_config"] == {"model_type": "llama", "hidden_size": 8}
    assert ck.base_config(out) == ck.base_config(base)

    cp = ck.read_checkpoint(out)
    assert cp.path == out and cp.base_dir == out
    assert cp.tensors.keys() == ts.keys()
    for k, t in ts.items():
        assert cp.tensors[k].dtype == t.dtype and torch.equal(cp.tensors[k], t)
    mf = cp.manifest
    assert mf["format_version"] == ck.FORMAT_VERSION
    assert mf["base"]["origin"] == "tiny-test" and mf["base"]["embedded"] is True
    assert mf["base"]["path"] == "."  # where the base weights are, relative to the checkpoint
    assert mf["base"]["files"] == {"model.safetensors": ck.sha256_file(base / "model.safetensors"),
                                   "tokenizer.json": ck.sha256_file(base / "tokenizer.json")}
    assert mf["state_sha256"] == ck.sha256_file(out / ck.WEIGHTS_NAME)
    assert mf["base"]["config_sha256"] == ck.config_digest({"model_type": "llama", "hidden_size": 8})
    assert mf["tensors"]["side.0"] == {"shape": [8, 16], "dtype": "float32"}
    assert mf["tensors"]["mask.0"]["dtype"] == "bool"
    assert mf["edits"] == manifest()["edits"] and mf["tool"]["version"] == "0.2.0"
    with safetensors.safe_open(str(out / ck.WEIGHTS_NAME), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_patch_only_references_base(base, tmp_path):
    out = tmp_path / "p"
    steps: list[str] = []
    ck.write_checkpoint(out, base_dir=base, tensors=tensors(), manifest=manifest(), patch_only=True,
                        progress=steps.append)
    assert not list(out.glob("model*.safetensors")) and (out / "config.json").is_file()
    assert "hashing model.safetensors" in steps
    cp = ck.read_checkpoint(out)
    assert cp.base_dir == base.resolve() and cp.manifest["base"]["embedded"] is False


def test_patch_only_base_missing(base, tmp_path):
    out = tmp_path / "p"
    ck.write_checkpoint(out, base_dir=base, tensors=tensors(), manifest=manifest(), patch_only=True)
    base.rename(tmp_path / "moved")
    with pytest.raises(CheckpointError, match="not found") as e:
        ck.read_checkpoint(out)
    assert e.value.hint
    assert ck.read_checkpoint(out, verify=False).tensors.keys() == tensors().keys()


@pytest.mark.parametrize("patch_only", [False, True])
def test_tampered_base_weight(base, tmp_path, patch_only):
    out = tmp_path / "p"
    ck.write_checkpoint(out, base_dir=base, tensors=tensors(), manifest=manifest(), patch_only=patch_only)
    ck.read_checkpoint(out)  # fine before
    target = (base if patch_only else out) / "model.safetensors"
    with open(target, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(CheckpointError, match="SHA-256 does not match") as e:
        ck.read_checkpoint(out)
    assert "model.safetensors" in str(e.value) and "re-run wise edit" in e.value.hint


def test_shape_mismatch_names_tensor(base, tmp_path):
    out = tmp_path / "p"
    ck.write_checkpoint(out, base_dir=base, tensors=tensors(), manifest=manifest())
    mf = json.loads((out / ck.MANIFEST_NAME).read_text())
    mf["tensors"]["side.0"]["shape"] = [16, 8]
    (out / ck.MANIFEST_NAME).write_text(json.dumps(mf))
    with pytest.raises(CheckpointError, match=r"'side\.0' has shape \[8, 16\]"):
        ck.read_checkpoint(out)


def test_key_and_dtype_mismatch(base, tmp_path):
    out = tmp_path / "p"
    ck.write_checkpoint(out, base_dir=base, tensors=tensors(), manifest=manifest())
    mf = json.loads((out / ck.MANIFEST_NAME).read_text())
    mf["tensors"]["threshold"]["dtype"] = "float32"
    (out / ck.MANIFEST_NAME).write_text(json.dumps(mf))
    with pytest.raises(CheckpointError, match=r"'threshold' has dtype float64"):
        ck.read_checkpoint(out)
    del mf["tensors"]["mask.0"]
    (out / ck.MANIFEST_NAME).write_text(json.dumps(mf))
    with pytest.raises(CheckpointError, match=r"'mask\.0' is not listed"):
        ck.read_checkpoint(out)


@pytest.mark.parametrize("content, msg", [
    (None, "no wise.json"), ("{nope", "not valid JSON"), ("{}", "format_version"),
    ('{"format_version": 99}', "newer"), ('{"format_version": 1}', "'base'"),
])
def test_bad_manifest(tmp_path, content, msg):
    d = tmp_path / "x"
    d.mkdir()
    if content is not None:
        (d / ck.MANIFEST_NAME).write_text(content)
    with pytest.raises(CheckpointError, match=msg):
        ck.read_checkpoint(d)
    with pytest.raises(CheckpointError, match="no such directory"):
        ck.read_checkpoint(tmp_path / "missing")


def test_corrupt_side_weights(base, tmp_path):
    out = tmp_path / "p"
    ck.write_checkpoint(out, base_dir=base, tensors=tensors(), manifest=manifest())
    (out / ck.WEIGHTS_NAME).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="wise.safetensors: does not match the SHA-256"):
        ck.read_checkpoint(out)
    # a forger who also updates the checksum still meets the file's own check
    mf = json.loads((out / ck.MANIFEST_NAME).read_text())
    mf["state_sha256"] = ck.sha256_file(out / ck.WEIGHTS_NAME)
    (out / ck.MANIFEST_NAME).write_text(json.dumps(mf))
    with pytest.raises(CheckpointError, match="wise.safetensors: unreadable"):
        ck.read_checkpoint(out)


def test_existing_out_needs_force(base, tmp_path):
    out = tmp_path / "p"
    ck.write_checkpoint(out, base_dir=base, tensors=tensors(), manifest={**manifest(), "n": 1})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputExistsError, match="already exists") as e:
        ck.write_checkpoint(out, base_dir=base, tensors={}, manifest={**manifest(), "n": 2})
    assert "--force" in e.value.hint
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    ck.write_checkpoint(out, base_dir=base, tensors={}, manifest={**manifest(), "n": 2}, force=True)
    cp = ck.read_checkpoint(out)
    assert cp.manifest["n"] == 2 and cp.tensors == {}
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no tmp/old left


def test_force_refuses_files_and_foreign_dirs(base, tmp_path):
    f = tmp_path / "file"
    f.write_text("keep")
    foreign = tmp_path / "docs"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    for out in (f, foreign):
        with pytest.raises(OutputExistsError):
            ck.write_checkpoint(out, base_dir=base, tensors={}, manifest=manifest(), force=True)
    assert f.read_text() == "keep" and (foreign / "notes.txt").read_text() == "keep"
    empty = tmp_path / "empty"
    empty.mkdir()
    ck.write_checkpoint(empty, base_dir=base, tensors={}, manifest=manifest(), force=True)
    assert ck.is_patched(empty)


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failure_mid_write_leaves_nothing(base, tmp_path, monkeypatch, exc):
    def boom(*a, **k):
        raise exc
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    parent = tmp_path / "outs"
    with pytest.raises(type(exc)):
        ck.write_checkpoint(parent / "p", base_dir=base, tensors=tensors(), manifest=manifest())
    assert list(parent.iterdir()) == []


def test_failure_during_force_keeps_old(base, tmp_path, monkeypatch):
    out = tmp_path / "p"
    ck.write_checkpoint(out, base_dir=base, tensors=tensors(), manifest={**manifest(), "n": 1})
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        ck.write_checkpoint(out, base_dir=base, tensors={}, manifest={**manifest(), "n": 2}, force=True)
    assert ck.read_checkpoint(out).manifest["n"] == 1
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no tmp/old left


def test_out_overlapping_base_refused(base):
    for out in (base, base / "patched", base.parent):
        with pytest.raises(WiseError, match="overlaps the model"):
            ck.write_checkpoint(out, base_dir=base, tensors={}, manifest=manifest(), force=True)
    assert sorted(p.name for p in base.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_missing_base_refused(tmp_path):
    with pytest.raises(ModelError):
        ck.write_checkpoint(tmp_path / "p", base_dir=tmp_path / "nope", tensors={}, manifest=manifest())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no weight files"):
        ck.write_checkpoint(tmp_path / "p", base_dir=tmp_path / "empty", tensors={}, manifest=manifest())


def test_patched_dir_as_base(base, tmp_path):
    v1 = tmp_path / "v1"
    ck.write_checkpoint(v1, base_dir=base, tensors={"old": torch.zeros(3)}, manifest=manifest())
    v2 = tmp_path / "v2"
    ck.write_checkpoint(v2, base_dir=v1, tensors={"new": torch.ones(2)}, manifest=manifest())
    cp = ck.read_checkpoint(v2)
    assert set(cp.tensors) == {"new"}
    assert set(cp.manifest["base"]["files"]) == {"model.safetensors", "tokenizer.json"}
    assert cp.manifest["base"]["path"] == "."

    # a patch-only checkpoint holds no weights: patching it again references the real base
    p1 = tmp_path / "p1"
    ck.write_checkpoint(p1, base_dir=base, tensors={"old": torch.zeros(3)}, manifest=manifest(), patch_only=True)
    p2 = tmp_path / "p2"
    ck.write_checkpoint(p2, base_dir=p1, tensors={"new": torch.ones(2)}, manifest=manifest(), patch_only=True)
    assert not (p2 / "model.safetensors").exists()
    assert ck.read_checkpoint(p2).base_dir == base.resolve()


def test_symlinked_weights_are_followed(base, tmp_path):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (base / "model.safetensors").rename(blobs / "abc")
    (base / "model.safetensors").symlink_to(os.path.relpath(blobs / "abc", base))
    out = tmp_path / "p"
    ck.write_checkpoint(out, base_dir=base, tensors={}, manifest=manifest())
    assert not (out / "model.safetensors").is_symlink()
    ck.read_checkpoint(out)


def test_layout_helpers(base):
    (base / "model-00001-of-00002.safetensors").write_bytes(b"x")
    (base / "model.safetensors.index.json").write_text("{}")
    (base / "pytorch_model.bin").write_bytes(b"x")
    (base / ck.WEIGHTS_NAME).write_bytes(b"x")
    (base / "README.md").write_text("x")
    assert [p.name for p in ck.base_weight_files(base)] == [
        "model-00001-of-00002.safetensors", "model.safetensors", "model.safetensors.index.json",
        "pytorch_model.bin"]
    assert [p.name for p in ck.base_aux_files(base)] == ["config.json", "tokenizer.json"]


def test_hash_cache_avoids_rehash(base, tmp_path, monkeypatch):
    weights = base / "model.safetensors"
    os.utime(weights, ns=(OLD_NS, OLD_NS))
    calls: list[Path] = []
    real = hashing.sha256_file

    def counting(path):  # the base weights' hashing only: they are the big files
        if Path(path).name == "model.safetensors":
            calls.append(Path(path))
        return real(path)
    monkeypatch.setattr(hashing, "sha256_file", counting)

    out = tmp_path / "p"
    ck.write_checkpoint(out, base_dir=base, tensors={}, manifest=manifest())
    assert len(calls) == 1
    ck.read_checkpoint(out)  # the embedded link/copy inherits the base's cached hash
    ck.read_checkpoint(out)
    assert ck.sha256_file_cached(weights) == real(weights)
    assert len(calls) == 1
    assert (tmp_path / "cache" / "hashes.json").is_file()

    os.utime(weights, ns=(OLD_NS + 1, OLD_NS + 1))  # a changed mtime invalidates the entry
    ck.sha256_file_cached(weights)
    assert len(calls) == 2


def test_hash_cache_unreadable_is_ignored(base, tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "hashes.json").write_text("not json")
    weights = base / "model.safetensors"
    os.utime(weights, ns=(OLD_NS, OLD_NS))
    assert ck.sha256_file_cached(weights) == ck.sha256_file(weights)
    assert json.loads((tmp_path / "cache" / "hashes.json").read_text())["version"] == 1


def test_recent_files_not_cached(base, tmp_path):
    """A hash taken right after a write may miss a same-size rewrite in the same mtime tick."""
    ck.sha256_file_cached(base / "model.safetensors")
    assert not (tmp_path / "cache" / "hashes.json").exists()


def test_failed_swap_restores_old(base, tmp_path, monkeypatch):
    out = tmp_path / "p"
    ck.write_checkpoint(out, base_dir=base, tensors=tensors(), manifest={**manifest(), "n": 1})
    real_rename = os.rename

    def rename(src, dst):
        if ".tmp-" in str(src):
            raise OSError("simulated")
        real_rename(src, dst)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # the two-rename path, as without renameat2
    with pytest.raises(OSError, match="simulated"):
        ck.write_checkpoint(out, base_dir=base, tensors={}, manifest={**manifest(), "n": 2}, force=True)
    assert ck.read_checkpoint(out).manifest["n"] == 1
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
