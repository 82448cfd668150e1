"""``wise edit --method ultraedit`` end to end on a tiny model: a plain checkpoint that plain
transformers loads with its edits, continued runs, patch-only checkpoints, export, and the
errors a user meets."""
from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM

from wisecli.app.pipeline import EditOptions, edit
from wisecli.app.session import open_model
from wisecli.records import EditRecord

from cli_support import run_main
from conftest import EDITS, write_jsonl

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPTS = ["the capital of france is", "a quiet morning in the valley"]
# a learning rate that moves a tiny random model within one turn
CONFIG = "learning_rate: 0.01\npasses: 2\n"


def _logits(model, tok, prompts=PROMPTS) -> torch.Tensor:
    batch = tok(prompts, return_tensors="pt", padding=True, return_token_type_ids=False)
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("ue")
    (d / "ue.yaml").write_text(CONFIG)
    first, more = write_jsonl(d / "a.jsonl", EDITS[:2]), write_jsonl(d / "b.jsonl", EDITS[2:])
    opts = dict(method="ultraedit", config_file=str(d / "ue.yaml"), evaluate=False, device="cpu")
    edit(str(tiny_llama_dir), first, d / "full", EditOptions(**opts))
    edit(str(tiny_llama_dir), first, d / "patch", EditOptions(**opts, patch_only=True))
    edit(str(d / "full"), more, d / "full2", EditOptions(evaluate=False, device="cpu"))
    edit(str(d / "patch"), more, d / "patch2", EditOptions(evaluate=False, device="cpu"))
    return d


def test_plain_transformers_loads_the_edited_model_as_wise_does(runs, tiny_llama_dir):
    config = json.loads((runs / "full" / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config  # the base's own config
    assert not list(runs.glob("full/*.py"))
    plain = AutoModelForCausalLM.from_pretrained(str(runs / "full"), dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    sess = open_model(str(runs / "full"), device="cpu")
    assert sess.method == "ultraedit"
    edited = _logits(sess.model, sess.tokenizer)
    torch.testing.assert_close(_logits(plain, sess.tokenizer), edited, rtol=0, atol=1e-5)
    assert (edited - _logits(base, sess.tokenizer)).abs().max() > 1e-3
    with sess.mem.main_only():  # the unedited model, recovered from the shifts
        torch.testing.assert_close(_logits(sess.model, sess.tokenizer), _logits(base, sess.tokenizer),
                                   rtol=0, atol=1e-5)


def test_the_edits_raise_their_answers(runs, tiny_llama_dir):
    from wisecli.app.metrics import evaluate
    records = [EditRecord(id=e["id"], prompt=e["prompt"], target_new=e["target_new"]) for e in EDITS[:2]]
    before = open_model(str(tiny_llama_dir), device="cpu")
    after = open_model(str(runs / "full"), device="cpu")
    base = evaluate(before.model, before.tokenizer, None, records, generate=False)
    edited = evaluate(after.model, after.tokenizer, after.mem, records, generate=False)
    assert edited.reliability > base.reliability


def test_patch_only_and_embedded_checkpoints_continue_alike(runs):
    assert not (runs / "patch" / "model.safetensors").exists()
    full, patch = (safetensors.torch.load_file(str(runs / d / "wise.safetensors")) for d in ("full2", "patch2"))
    assert set(full) == set(patch) and any(k.startswith("shift.") for k in full)
    for name in full:  # the earlier edits' Σkkᵀ is large: its float32 sum differs by rounding
        scale = max(1.0, float(full[name].abs().max())) if full[name].is_floating_point() else 1.0
        torch.testing.assert_close(full[name], patch[name], rtol=0, atol=1e-6 * scale)
    a, b = open_model(str(runs / "full2"), device="cpu"), open_model(str(runs / "patch2"), device="cpu")
    torch.testing.assert_close(_logits(a.model, a.tokenizer), _logits(b.model, b.tokenizer), rtol=0, atol=1e-5)
    manifest = json.loads((runs / "full2" / "wise.json").read_text())
    assert manifest["method"] == "ultraedit" and len(manifest["edits"]) == 3 and manifest["router"]["turns"] == 2
    assert manifest["base"]["unedited_files"]["model.safetensors"] != manifest["base"]["files"]["model.safetensors"]


def test_info_and_merged_export_of_a_plain_checkpoint(runs, tmp_path, monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, "info", runs / "full2", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["mode"] == "weights" and len(info["target"]["modules"]) == 4
    code, out, err = run_main(monkeypatch, capsys, "export", runs / "full2", "--to", "merged", "-o", tmp_path / "m",
                              "--json")
    assert code == 0, err
    cost = json.loads(out)["folding_cost"]
    assert cost["unrelated_prompts"]["routed"] == cost["unrelated_prompts"]["folded"]  # nothing folded
    sess = open_model(str(runs / "full2"), device="cpu")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    torch.testing.assert_close(_logits(merged, sess.tokenizer), _logits(sess.model, sess.tokenizer), rtol=0, atol=1e-5)


@pytest.mark.parametrize("args,message", [
    (["--mode", "retrieve"], "--mode retrieve is for wise's side memories"),
    (["--module-path", "model.layers.1.mlp"], "not a linear layer"),
    (["--layer", "9"], "layer 9 is out of range"),
])
def test_bad_options_are_one_line_errors(args, message, tiny_llama_dir, tmp_path, monkeypatch, capsys):
    edits = write_jsonl(tmp_path / "e.jsonl", EDITS)
    code, _, err = run_main(monkeypatch, capsys, "edit", tiny_llama_dir, edits, "-o", tmp_path / "out",
                            "--method", "ultraedit", "--device", "cpu", *args)
    assert code != 0 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_patch_only_checkpoint_needs_an_unedited_base(runs, tmp_path, monkeypatch, capsys):
    edits = write_jsonl(tmp_path / "e.jsonl", EDITS[:1])
    code, _, err = run_main(monkeypatch, capsys, "edit", runs / "full", edits, "-o", tmp_path / "p", "--patch-only",
                            "--device", "cpu", "--no-eval")
    assert code != 0 and "holds edited weights" in err and not (tmp_path / "p").exists()


def test_a_checkpoint_with_a_foreign_tensor_is_refused(runs, tmp_path):
    import shutil
    from wisecli.errors import CheckpointError
    from wisecli.app.hashing import sha256_file
    bad = tmp_path / "bad"
    shutil.copytree(runs / "patch", bad)
    tensors = safetensors.torch.load_file(str(bad / "wise.safetensors"))
    tensors["memories"] = torch.zeros(1)
    safetensors.torch.save_file(tensors, str(bad / "wise.safetensors"))
    manifest = json.loads((bad / "wise.json").read_text())
    manifest["tensors"]["memories"] = {"shape": [1], "dtype": "float32"}
    manifest["state_sha256"] = sha256_file(bad / "wise.safetensors")
    (bad / "wise.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="tensor 'memories' is not one wise writes"):
        open_model(str(bad), device="cpu")


def test_a_bfloat16_run_keeps_float32_shifts_that_a_float32_load_reads_back(tiny_llama_dir, tmp_path):
    (tmp_path / "ue.yaml").write_text(CONFIG)
    edits = write_jsonl(tmp_path / "e.jsonl", EDITS)
    run = edit(str(tiny_llama_dir), edits, tmp_path / "bf16", EditOptions(
        method="ultraedit", config_file=str(tmp_path / "ue.yaml"), evaluate=False, device="cpu", dtype="bfloat16"))
    shifts = {k: v for k, v in safetensors.torch.load_file(str(tmp_path / "bf16" / "wise.safetensors")).items()
              if k.startswith("shift.")}
    assert shifts and all(v.dtype == torch.float32 and v.abs().max() > 0 for v in shifts.values())
    path = next(iter(shifts)).removeprefix("shift.")
    live = run.session.model.get_submodule(path).weight
    assert live.dtype == torch.bfloat16
    again = open_model(str(tmp_path / "bf16"), device="cpu", dtype="float32")
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    want = base.get_submodule(path).weight + shifts[f"shift.{path}"]
    torch.testing.assert_close(again.model.get_submodule(path).weight, want, rtol=0, atol=1e-6)


def test_the_python_api_loads_and_evaluates_a_plain_checkpoint(runs):
    import wisecli
    model, tok = wisecli.load(runs / "full", device="cpu")
    records = [EditRecord(id=e["id"], prompt=e["prompt"], target_new=e["target_new"],
                          locality_prompt=e.get("locality_prompt")) for e in EDITS[:2]]
    loaded = wisecli.evaluate(model, records, tokenizer=tok, generate=False, device="cpu")
    by_path = wisecli.evaluate(runs / "full", records, generate=False, device="cpu")
    assert loaded.locality == by_path.locality < 1.0  # measured against the unedited weights
    assert loaded.reliability == by_path.reliability


def test_a_continued_run_equals_one_run_in_the_same_turns(runs, tiny_llama_dir, tmp_path):
    """The lifelong statistics are state: two runs (2 edits, then 1) write what one run with
    turns of two writes."""
    once = edit(str(tiny_llama_dir), write_jsonl(tmp_path / "all.jsonl", EDITS), tmp_path / "once", EditOptions(
        method="ultraedit", config_file=str(runs / "ue.yaml"), evaluate=False, device="cpu", arrival=2))
    assert [p["shard"] for p in once.placed] == [0, 0, 1]
    one = safetensors.torch.load_file(str(tmp_path / "once" / "wise.safetensors"))
    two = safetensors.torch.load_file(str(runs / "full2" / "wise.safetensors"))
    assert set(one) == set(two)
    for name in one:
        # float32 sums taken in another order (a reloaded model, another batch): on some CPUs a
        # few entries differ by 3e-5 of their size; statistics not carried over differ by far more
        torch.testing.assert_close(one[name], two[name], rtol=1e-4, atol=1e-5)
