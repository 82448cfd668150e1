"""Every kind of bad input to the CLI: exit code, one error line naming the file, line and
field, and nothing written or overwritten.  A few run the installed ``wise`` script itself.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cli_support import env, error_line, files, invoke, leftovers, patched, run_main, run_script  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("single_thread")

# ---- bad input: exit 1, one line naming what is wrong, nothing written -------------------------

BAD_EDITS = {
    "malformed-json": ('{"prompt": "the king", "target_new": "rome"}\n{"prompt": "the king",\n',
                       [":2:", "invalid JSON"]),
    "missing-prompt": ('{"prompt": "the king", "target_new": "rome"}\n{"target_new": "rome"}\n',
                       [":2:", "field 'prompt'", "missing"]),
    "missing-target": ('{"prompt": "the king"}\n', [":1:", "field 'target_new'", "missing"]),
    "empty-target": ('{"prompt": "the king", "target_new": "  "}\n',
                     [":1:", "field 'target_new'", "empty"]),
    "wrong-type": ('{"prompt": "the king", "target_new": 5}\n',
                   [":1:", "field 'target_new'", "expected a string, got number"]),
    "empty-file": ("", ["no edit records"]),
}


@pytest.mark.parametrize("case", list(BAD_EDITS))
def test_bad_edit_file(case, tmp_path, tiny_llama_dir, monkeypatch, capsys):
    text, expected = BAD_EDITS[case]
    bad = tmp_path / f"{case}.jsonl"
    bad.write_text(text)
    code, out, err = run_main(monkeypatch, capsys, "edit", tiny_llama_dir, bad, "-o", tmp_path / "out")
    assert code == 1
    line = error_line(err)
    assert str(bad) in line
    for piece in expected:
        assert piece in line, line
    assert out == ""
    assert not leftovers(tmp_path, "out")


def _gguf(tmp_path: Path) -> Path:
    p = tmp_path / "model.gguf"
    p.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                dtype=torch.uint8).numpy().tobytes())
    return p


def _unknown_key_config(tmp_path: Path) -> Path:
    p = tmp_path / "typo.yaml"
    p.write_text("max_steps: 5\nmax_stepz: 10\n")
    return p


def _layer_config(tmp_path: Path) -> Path:
    p = tmp_path / "layer99.yaml"
    p.write_text("max_steps: 5\nlayer: 99\n")
    return p


def _bad_value_config(tmp_path: Path) -> Path:
    p = tmp_path / "bad-value.yaml"
    p.write_text("max_steps: 5\nlearned_nll: 0\n")
    return p


def _null_key_config(tmp_path: Path) -> Path:
    p = tmp_path / "null-key.yaml"
    p.write_text("null: x\nfoo: y\n")  # YAML reads the first key as None
    return p


BAD_ARGS = {
    # name: (MODEL, extra args, pieces of the error line)
    "missing-model": (lambda t, m: t / "no-such-model", [], ["no-such-model", "no such file or directory"]),
    "not-a-gguf": (lambda t, m: _gguf(t), [], ["model.gguf", "not a GGUF model file"]),
    "unknown-config-key": (lambda t, m: m, lambda t: ["--config", _unknown_key_config(t)],
                           ["typo.yaml:2", "unknown key 'max_stepz'"]),
    "bad-config-value": (lambda t, m: m, lambda t: ["--config", _bad_value_config(t)],
                         ["bad-value.yaml:2", "learned_nll", "must be > 0"]),
    "null-config-key": (lambda t, m: m, lambda t: ["--config", _null_key_config(t)],
                        ["null-key.yaml", "key None", "keys must be knob names"]),
    "unknown-method": (lambda t, m: m, ["--method", "rome"], ["unknown editing method 'rome'"]),
    "layer-out-of-range": (lambda t, m: m, ["--layer", "99"], ["--layer 99", "out of range", "0..3"]),
    "config-layer-out-of-range": (lambda t, m: m, lambda t: ["--config", _layer_config(t)],
                                  ["layer99.yaml", "field 'layer'", "out of range", "0..3"]),
    "no-cuda": (lambda t, m: m, ["--device", "cuda"], ["CUDA"]),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_model_or_option(case, tmp_path, files, tiny_llama_dir, monkeypatch, capsys):
    if case == "no-cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    model_of, extra, expected = BAD_ARGS[case]
    extra = extra(tmp_path) if callable(extra) else extra
    code, out, err = run_main(monkeypatch, capsys, "edit", model_of(tmp_path, tiny_llama_dir),
                              files["edits"], "-o", tmp_path / "out", "--config", files["config"], *extra)
    assert code == 1, err
    line = error_line(err)
    for piece in expected:
        assert piece in line, line
    assert not leftovers(tmp_path, "out")


def test_modified_base_of_patch_only_checkpoint(tmp_path, files, tiny_llama_dir, monkeypatch, capsys):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    patch = tmp_path / "patch"
    code, res = invoke("edit", base, files["edits"], "-o", patch, "--config", files["config"],
                       "--patch-only", "--no-eval", "--json")
    assert code == 0, res.output
    weights = base / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # a bit in the last tensor's data: still a loadable file
    weights.write_bytes(bytes(data))

    code, _, err = run_main(monkeypatch, capsys, "eval", patch, files["edits"], "--no-generate")
    assert code == 1
    line = error_line(err)
    assert str(weights) in line and "SHA-256" in line
    code, _, err = run_main(monkeypatch, capsys, "info", patch)
    assert code == 1 and str(weights) in error_line(err)
    code, _, err = run_main(monkeypatch, capsys, "edit", patch, files["more"], "-o", tmp_path / "v2")
    assert code == 1 and str(weights) in error_line(err)
    assert not leftovers(tmp_path, "v2")


# ---- existing output ---------------------------------------------------------------------


def test_existing_output_needs_force(patched, files, tiny_llama_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(patched[0], out)
    (out / "marker").write_text("keep me")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    code, _, err = run_main(monkeypatch, capsys, "edit", tiny_llama_dir, files["more"], "-o", out,
                            "--config", files["config"], "--no-eval")
    assert code == 1
    assert str(out) in error_line(err) and "already exists" in error_line(err)
    assert "--force" in err  # the hint
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    code, _, err = run_main(monkeypatch, capsys, "edit", tiny_llama_dir, files["more"], "-o", out,
                            "--config", files["config"], "--no-eval", "--force")
    assert code == 0, err
    assert not (out / "marker").exists()
    m = json.loads((out / "wise.json").read_text())
    assert [e["id"] for e in m["edits"]] == ["e4", "e5"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


def test_force_refuses_a_directory_wise_did_not_write(files, tiny_llama_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "home"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    code, _, err = run_main(monkeypatch, capsys, "edit", tiny_llama_dir, files["edits"], "-o", out,
                            "--config", files["config"], "--no-eval", "--force")
    assert code == 1 and "not a patched checkpoint" in error_line(err)
    assert (out / "notes.txt").read_text() == "precious"


# ---- the installed script ----------------------------------------------------------------


def test_script_error_is_one_line_and_debug_shows_traceback(tmp_path, tiny_llama_dir, env):
    bad = tmp_path / "edits.jsonl"
    bad.write_text('{"prompt": "the king"}\n')
    res = run_script("edit", tiny_llama_dir, bad, "-o", tmp_path / "out")
    assert res.returncode == 1
    assert res.stdout == ""
    line = error_line(res.stderr)
    assert line == f"error: {bad}:1: field 'target_new': missing required field"
    res = run_script("edit", tiny_llama_dir, bad, "-o", tmp_path / "out", debug=True)
    assert res.returncode == 1
    assert "Traceback" in res.stderr and "InputError" in res.stderr
    assert not leftovers(tmp_path, "out")


def test_script_usage_error_exits_2(tmp_path, tiny_llama_dir, env):
    res = run_script("eval", tiny_llama_dir, tmp_path / "e.jsonl", "--min-reliability", "1.01")
    assert res.returncode == 2
    assert "--min-reliability" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("command", ["edit", "bench"])
def test_bad_mode_is_usage_error(command, files, tiny_llama_dir, tmp_path, monkeypatch, capsys):
    args = [tiny_llama_dir, files["edits"], "-o", tmp_path / "out"] if command == "edit" else [tiny_llama_dir]
    code, _, err = run_main(monkeypatch, capsys, command, *args, "--mode", "mixed")
    assert code == 2 and "--mode" in err and "'mixed' is not one of" in err
    assert not leftovers(tmp_path, "out")


def test_version_prints_the_package_version(monkeypatch, capsys):
    from wisecli import __version__
    code, out, _ = run_main(monkeypatch, capsys, "--version")
    assert code == 0 and out.strip() == f"wise {__version__}"


def test_internal_error_is_one_plain_line_with_its_own_exit_code(patched, monkeypatch, capsys):
    """A bug (not bad input) prints its message as text, brackets and all, names the way to
    the traceback, and exits 4, apart from bad input's 1."""
    import wisecli.app.cli.info as info_cmd

    def broken(*_a, **_k):
        raise KeyError("target [red]x[/red]")

    monkeypatch.setattr(info_cmd, "read_patched", broken)
    code, out, err = run_main(monkeypatch, capsys, "info", patched[0])
    assert code == 4 and out == ""
    assert error_line(err) == "error: internal error: KeyError: 'target [red]x[/red]'"
    assert "WISE_DEBUG=1" in err


def test_a_removed_knob_loads_at_its_no_op_value_and_is_named_otherwise(files, tiny_llama_dir, tmp_path,
                                                                        monkeypatch, capsys):
    cfg = tmp_path / "old.yaml"
    cfg.write_text(files["config"].read_text() + "ties_density: 1.0\nweight_decay: 0.01\n")
    code, _, err = run_main(monkeypatch, capsys, "edit", tiny_llama_dir, files["edits"], "-o", tmp_path / "out",
                            "--config", cfg, "--no-eval")
    line = error_line(err)
    assert code == 1 and f"{cfg}:" in line and "'weight_decay' was removed" in line
    cfg.write_text(files["config"].read_text() + "ties_density: 1.0\nweight_decay: 0.0\noptimizer: sgd\n")
    code, out, err = run_main(monkeypatch, capsys, "edit", tiny_llama_dir, files["edits"], "-o", tmp_path / "out",
                              "--config", cfg, "--no-eval", "--json")
    assert code == 0, err
    assert "ties_density" not in json.loads((tmp_path / "out" / "wise.json").read_text())["config"]


@pytest.mark.parametrize("change,field", [
    (lambda m: m.pop("tool"), "(top level)"),
    (lambda m: m.__setitem__("metrics", [1]), "metrics"),
    (lambda m: m["target"].__setitem__("module_path", 5), "target.module_path"),
    (lambda m: m["edits"][0].__setitem__("subject", 5), "edits[0].subject"),
    (lambda m: m["edits"][1].__setitem__("memory", "x"), "edits[1].memory"),
    (lambda m: m["base"].__setitem__("files", {}), "base.files"),
])
def test_a_manifest_that_does_not_fit_the_schema_is_named(change, field, patched, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ckpt"
    shutil.copytree(patched[0], out)
    manifest = json.loads((out / "wise.json").read_text())
    change(manifest)
    (out / "wise.json").write_text(json.dumps(manifest))
    for command in (["info", out], ["generate", out, "the king"]):
        code, stdout, err = run_main(monkeypatch, capsys, *command)
        line = error_line(err)
        assert code == 1 and stdout == "" and f"{out / 'wise.json'}: field '{field}'" in line, line
