"""The real CLI on tiny checkpoints: what each command writes and prints, and exit codes.

Commands whose output matters run through ``typer.testing.CliRunner``; exit codes and error
messages are mapped in ``wisecli.app.cli.main.main``, so those tests call ``main()`` itself (in
process, fast).  Bad input is in ``test_cli_errors.py``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_support import CONFIG, env, error_line, files, invoke, patched, run_main  # noqa: F401  (fixtures)
from conftest import EDITS
from wisecli.app.manifest import FORMAT_VERSION

pytestmark = pytest.mark.usefixtures("single_thread")

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
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(m["base"]["files"])
    assert "config.json" not in m["base"]["files"] and len(m["base"]["config_sha256"]) == 64
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
    assert base["embedded"] is False and not Path(base["path"]).is_absolute()  # relative to the checkpoint
    assert (out / base["path"]).resolve() == tiny_llama_dir.resolve()
    code, res = invoke("eval", out, files["edits"], "--json", "--no-generate")
    assert code == 0, res.output
    report = json.loads(res.stdout)
    assert report["n_edits"] == 3 and report["generated_accuracy"] is None
    assert all(e["routed"] is not None for e in report["edits"])


def test_config_file_places_the_memory(tmp_path, files, tiny_llama_dir):
    """`layer` (or `layer_fraction`) in --config moves the memory, and the manifest says where."""
    cfg = tmp_path / "layer1.yaml"
    cfg.write_text(files["config"].read_text() + "layer: 1\n")
    out = tmp_path / "at1"
    code, res = invoke("edit", tiny_llama_dir, files["edits"], "-o", out, "--config", cfg,
                       "--patch-only", "--no-eval", "--json")
    assert code == 0, res.output
    assert json.loads(res.stdout)["module"] == "model.layers.1.mlp.down_proj"
    m = json.loads((out / "wise.json").read_text())
    assert m["target"]["layer"] == 1 and m["config"]["layer"] == 1
    frac = tmp_path / "frac.yaml"
    frac.write_text(files["config"].read_text() + "layer_fraction: 0.5\n")  # 4 layers -> layer 2
    code, res = invoke("edit", tiny_llama_dir, files["edits"], "-o", tmp_path / "at2", "--config", frac,
                       "--patch-only", "--no-eval", "--json")
    assert code == 0, res.output
    assert json.loads(res.stdout)["module"] == "model.layers.2.mlp.down_proj"
    # continuing that checkpoint with a config naming another layer is refused, not ignored
    other = tmp_path / "layer2.yaml"
    other.write_text("layer: 2\n")
    code, res = invoke("edit", out, files["more"], "-o", tmp_path / "next", "--config", other, "--json")
    assert code != 0 and "differs from the checkpoint's layer 1" in str(res.exception)
    assert not (tmp_path / "next").exists()


def test_info_json_lists_the_edits(patched):
    out, _ = patched
    code, res = invoke("info", out, "--json")
    assert code == 0, res.output
    info = json.loads(res.stdout)
    assert [e["id"] for e in info["edits"]] == ["e1", "e2", "e3"]
    assert info["verified"] is True and info["mode"] == "merge"
    assert info["target"]["layer"] == 3 and info["format_version"] == FORMAT_VERSION
    assert "edits" not in info["metrics"] and "reliability" in info["metrics"]
    size = (out / "wise.safetensors").stat().st_size
    assert info["state_bytes"] == size and info["state_bytes_per_edit"] == size // 3
    code, res = invoke("info", out)  # the table form runs too
    assert code == 0 and "edits applied" in res.stdout and "KiB per edit" in res.stdout


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
    assert code == 2 and "--output" in err and "Missing option" in err


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


def test_every_json_output_shares_one_top_level(patched, files, tiny_llama_dir, tmp_path):
    """--json outputs say which output they are, in which layout, from which wise."""
    from wisecli import __version__
    out, summary = patched
    outputs = {"edit": summary}
    for kind, args in (("eval", ["eval", out, files["edits"], "--no-generate"]), ("info", ["info", out]),
                       ("generate", ["generate", out, "the king", "--max-new-tokens", "1"])):
        code, res = invoke(*args, "--json")
        assert code == 0, res.output
        outputs[kind] = json.loads(res.stdout)
    for kind, obj in outputs.items():
        assert list(obj)[:2] == ["schema", "wise_version"], kind
        assert obj["schema"] == f"wise/{kind}/1" and obj["wise_version"] == __version__


def test_eval_measures_use_and_gates_on_it(patched, files):
    """The use figures are in --json and the manifest; their gates agree with them; chat is
    n/a for a tokenizer without a chat template, which passes --min-chat and
    --min-same-subject-chat."""
    out, _ = patched
    code, res = invoke("eval", out, files["edits"], "--json", "--min-chat", "0.9", "--min-same-subject-chat", "0.9")
    assert code == 0, res.output
    report = json.loads(res.stdout)
    assert report["chat_accuracy"] is None and report["same_subject_chat"] is None
    for key in ("repetition", "leakage", "same_subject_locality"):
        assert report[key] is None or 0.0 <= report[key] <= 1.0
    assert report["generation_entropy"] >= 0
    assert all(len(e["use"]["continuation"]) > 0 for e in report["edits"])
    code, res = invoke("eval", out, files["edits"], "--json", "--max-repetition", "0")
    assert code == (3 if report["repetition"] > 0 else 0)
    manifest = json.loads((out / "wise.json").read_text())
    assert "repetition" in manifest["metrics"] and "chat_accuracy" in manifest["metrics"]
