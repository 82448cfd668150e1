"""The real CLI on tiny checkpoints: what each command writes and prints, exit codes, and the
one-line errors of ``main()`` for every kind of bad input.

Commands whose output matters run through ``typer.testing.CliRunner``; exit codes and error
messages are mapped in ``wisecli.cli.app.main``, so those tests call ``main()`` itself (in
process, fast) and a few run the installed ``wise`` script in a subprocess.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from wisecli.cli.app import app, main

from conftest import EDITS, MORE_EDITS, write_jsonl

pytestmark = pytest.mark.usefixtures("single_thread")

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


# ---- what the commands write and print -----------------------------------------------


def test_edit_writes_a_full_checkpoint(patched, tiny_llama_dir):
    out, summary = patched
    names = {p.name for p in out.iterdir()}
    assert {"wise.json", "wise.safetensors", "config.json", "model.safetensors",
            "tokenizer.json", "tokenizer_config.json"} <= names
    assert summary["n_edits"] == 3 and summary["edits_total"] == 3
    assert summary["mode"] == "merge" and summary["memories"] == 1
    assert summary["module"] == "model.layers.3.mlp.down_proj"
    assert summary["metrics"]["n_edits"] == 3
    m = json.loads((out / "wise.json").read_text())
    assert m["base"]["embedded"] is True
    assert set(m["base"]["files"]) == {"model.safetensors"}
    assert [e["id"] for e in m["edits"]] == ["e1", "e2", "e3"]
    assert m["config"]["max_steps"] == 10 and m["config"]["n_prefixes"] == 2
    assert len(m["editor"]["prefixes"]) == 2 and len(m["editor"]["negatives"]) == 4
    assert len(m["runs"]) == 1 and m["router"]["n_memories"] == 1
    # the base weights are carried over byte for byte
    assert (out / "model.safetensors").read_bytes() == (tiny_llama_dir / "model.safetensors").read_bytes()


def test_patch_only_writes_no_weights_and_evaluates(tmp_path, files, tiny_llama_dir):
    out = tmp_path / "patch"
    code, res = invoke("edit", tiny_llama_dir, files["edits"], "-o", out, "--config", files["config"],
                       "--patch-only", "--no-eval", "--json")
    assert code == 0, res.output
    assert json.loads(res.stdout)["metrics"] is None
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" not in names and {"wise.json", "wise.safetensors", "config.json"} <= names
    base = json.loads((out / "wise.json").read_text())["base"]
    assert base["embedded"] is False and Path(base["path"]) == tiny_llama_dir.resolve()
    code, res = invoke("eval", out, files["edits"], "--json", "--no-generate")
    assert code == 0, res.output
    report = json.loads(res.stdout)
    assert report["n_edits"] == 3 and report["generated_accuracy"] is None
    assert all(e["routed"] is not None for e in report["edits"])


def test_info_json_lists_the_edits(patched):
    out, _ = patched
    code, res = invoke("info", out, "--json")
    assert code == 0, res.output
    info = json.loads(res.stdout)
    assert [e["id"] for e in info["edits"]] == ["e1", "e2", "e3"]
    assert info["verified"] is True and info["mode"] == "merge"
    assert info["target"]["layer"] == 3 and info["format_version"] == 1
    assert "edits" not in info["metrics"] and "reliability" in info["metrics"]
    code, res = invoke("info", out)  # the table form runs too
    assert code == 0 and "edits applied" in res.stdout


def _check_metrics(report: dict) -> None:
    assert report["n_edits"] == 3
    for key in ("reliability", "generalization", "locality", "generated_accuracy"):
        v = report[key]
        assert v is None or (isinstance(v, float) and 0.0 <= v <= 1.0), (key, v)


def test_eval_json(patched, files):
    out, _ = patched
    code, res = invoke("eval", out, files["edits"], "--json")
    assert code == 0, res.output
    report = json.loads(res.stdout)
    _check_metrics(report)
    assert report["gates"] == {"passed": True, "failed": []}
    assert [e["id"] for e in report["edits"]] == ["e1", "e2", "e3"]


def test_eval_gate_unmet_exits_3(patched, files, monkeypatch, capsys):
    out, _ = patched
    code, stdout, _ = run_main(monkeypatch, capsys, "eval", out, files["edits"], "--json", "--no-generate")
    assert code == 0
    # A gate just above the measured figure must fail; one at it must pass.
    figure = json.loads(stdout)["generalization"]
    gate = min(1.0, round(figure + 0.01, 2))
    if figure >= 1.0:
        pytest.skip("generalization is already perfect on this tiny model")
    code, stdout, err = run_main(monkeypatch, capsys, "eval", out, files["edits"], "--json",
                                 "--no-generate", "--min-generalization", str(gate))
    report = json.loads(stdout)
    assert code == 3, err
    assert report["gates"]["passed"] is False
    assert report["gates"]["failed"][0]["metric"] == "generalization"
    assert "generalization" in error_line(err) and f"--min-generalization {gate}" in error_line(err)
    code, _, _ = run_main(monkeypatch, capsys, "eval", out, files["edits"], "--json",
                          "--no-generate", "--min-generalization", str(max(0.0, figure - 0.01)))
    assert code == 0


def test_eval_gate_out_of_range_is_usage_error(patched, files, monkeypatch, capsys):
    out, _ = patched
    code, _, err = run_main(monkeypatch, capsys, "eval", out, files["edits"], "--min-reliability", "1.01")
    assert code == 2
    assert "--min-reliability" in err and "Traceback" not in err


def test_missing_output_option_is_usage_error(files, tiny_llama_dir, monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "edit", tiny_llama_dir, files["edits"])
    assert code == 2 and "-o/--output" in err


def test_generate_routes_an_edited_prompt(patched):
    out, _ = patched
    code, res = invoke("generate", out, EDITS[0]["prompt"], "--max-new-tokens", "3", "--json")
    assert code == 0, res.output
    gens = json.loads(res.stdout)["generations"]
    assert len(gens) == 1 and gens[0]["memory"] == "side[0]"


def test_lifelong_second_edit_keeps_the_first(patched, files, tmp_path):
    first, _ = patched
    second = tmp_path / "v2"
    code, res = invoke("edit", first, files["more"], "-o", second, "--config", files["config"],
                       "--no-eval", "--json")
    assert code == 0, res.output
    assert json.loads(res.stdout)["edits_total"] == 5
    code, res = invoke("info", second, "--json")
    assert code == 0, res.output
    info = json.loads(res.stdout)
    assert [e["id"] for e in info["edits"]] == ["e1", "e2", "e3", "e4", "e5"]
    assert [e["run"] for e in info["edits"]] == [0, 0, 0, 1, 1]
    m1 = json.loads((first / "wise.json").read_text())
    assert len(info["runs"]) == 2 and info["runs"][0] == m1["runs"][0]
    assert info["runs"][1]["edits_file"] == str(files["more"])
    assert info["editor"]["prefixes"] == m1["editor"]["prefixes"]  # generated once, reused
    assert info["editor"]["shards_trained"] == 2
    assert info["router"]["n_memories"] == 1  # merge mode folds into the one memory
    assert info["base"]["origin"] == m1["base"]["origin"]
    assert (first / "wise.json").read_text() == json.dumps(m1, indent=2) + "\n"  # first untouched


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


BAD_ARGS = {
    # name: (MODEL, extra args, pieces of the error line)
    "missing-model": (lambda t, m: t / "no-such-model", [], ["no-such-model", "no such file or directory"]),
    "not-a-gguf": (lambda t, m: _gguf(t), [], ["model.gguf", "not a GGUF model file"]),
    "unknown-config-key": (lambda t, m: m, lambda t: ["--config", _unknown_key_config(t)],
                           ["typo.yaml", "unknown key 'max_stepz'"]),
    "layer-out-of-range": (lambda t, m: m, ["--layer", "99"], ["--layer 99", "out of range", "0..3"]),
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


# ---- regressions ----------------------------------------------------------------------------


def test_config_file_applies_when_continuing_a_checkpoint(patched, files, tmp_path):
    cfg = tmp_path / "second.yaml"
    cfg.write_text(CONFIG.replace("max_steps: 10", "max_steps: 7"))
    code, res = invoke("edit", patched[0], files["more"], "-o", tmp_path / "v2", "--config", cfg,
                       "--no-eval", "--json")
    assert code == 0, res.output
    m = json.loads((tmp_path / "v2" / "wise.json").read_text())
    assert m["runs"][1]["config"]["max_steps"] == 7


@pytest.mark.parametrize("name, text, piece", [
    ("e[v2].jsonl", '{"prompt": "the king"}\n', "e[v2].jsonl:1"),
    ("edits.jsonl", '{"prompt": "the king", "target_new": "rome", "portability": ["[/b]"]}\n', "[/b]"),
])
def test_error_message_is_printed_verbatim(name, text, piece, tmp_path, tiny_llama_dir, monkeypatch, capsys):
    bad = tmp_path / name
    bad.write_text(text)
    code, _, err = run_main(monkeypatch, capsys, "edit", tiny_llama_dir, bad, "-o", tmp_path / "out")
    assert code == 1
    assert piece in error_line(err)
