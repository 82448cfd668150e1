"""``wise export`` on tiny checkpoints: the folded model is a plain checkpoint any transformers
loads, it answers as the memory did, and what folding changes is measured and written down.
The GGUF path needs a base converted from a GGUF: test_real.py runs it on smollm2."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from wisecli.batching import encode_pairs
from wisecli.app.session import open_model

from cli_support import env, error_line, files, leftovers, run_main  # noqa: F401  (fixtures)
from conftest import EDITS, MORE_EDITS, write_jsonl

pytestmark = pytest.mark.usefixtures("single_thread")
LEARN = "learning_rate: 0.5\nreplay_weight: 0.15\nmax_steps: 60\nmask_ratio: 0.5\nn_prefixes: 2\n" \
        "n_negatives: 4\nnegative_lengths: [4]\nnegatives_per_step: 4\n"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_llama_dir, env):
    """One merge-mode checkpoint (one memory) and one retrieve-mode (three)."""
    from wisecli.app.pipeline import EditOptions, edit
    d = tmp_path_factory.mktemp("export")
    (d / "learn.yaml").write_text(LEARN)
    edits = write_jsonl(d / "edits.jsonl", EDITS + MORE_EDITS)
    options = EditOptions(config_file=str(d / "learn.yaml"), evaluate=False, device="cpu")
    edit(str(tiny_llama_dir), edits, d / "merge", options)
    (d / "retrieve.yaml").write_text(LEARN + "edits_per_shard: 2\nshards_per_merge: 1\n")
    edit(str(tiny_llama_dir), edits, d / "retrieve",
         EditOptions(**{**options.__dict__, "mode": "retrieve", "config_file": str(d / "retrieve.yaml")}))
    return {"dir": d, "edits": edits, "merge": d / "merge", "retrieve": d / "retrieve"}


def _logits(model, tok, texts):
    batch = encode_pairs(tok, texts, [None] * len(texts))
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids).logits


def test_merged_export_is_a_plain_checkpoint_that_answers_as_the_memory(checkpoints, tmp_path, monkeypatch, capsys):
    out = tmp_path / "folded"
    code, stdout, err = run_main(monkeypatch, capsys, "export", checkpoints["merge"], "--to", "merged", "-o", out,
                                 "--edits", checkpoints["edits"], "--device", "cpu", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    cost = result["folding_cost"]
    assert result["schema"] == "wise/export/1" and result["memory"] == 0
    assert cost["edits"]["n"] == len(EDITS + MORE_EDITS) and cost["unrelated_prompts"]["n"] == 40
    assert cost["locality_prompts"]["n"] == sum(1 for e in EDITS + MORE_EDITS if e.get("locality_prompt"))
    for group in ("edits", "locality_prompts", "unrelated_prompts"):
        assert 0.0 <= cost[group]["folded"] <= 1.0 and 0.0 <= cost[group]["routed"] <= 1.0
    assert json.loads((out / "export.json").read_text())["folding_cost"] == cost
    assert "wise.json" not in {p.name for p in out.iterdir()}
    folded = AutoModelForCausalLM.from_pretrained(str(out))  # plain transformers, no remote code
    sess = open_model(str(checkpoints["merge"]), device="cpu")
    prompts = [e["prompt"] for e in EDITS + MORE_EDITS] + ["who plays music in the big city"]
    routed = _logits(sess.model, sess.tokenizer, prompts)
    routes = sess.mem.last_route.tolist()
    got = _logits(folded, sess.tokenizer, prompts)
    assert any(r == 0 for r in routes)
    for i, r in enumerate(routes):  # where the router took the memory, folding changes nothing
        if r == 0:
            torch.testing.assert_close(got[i], routed[i], rtol=1e-4, atol=1e-4)


def test_several_memories_need_one_named(checkpoints, tmp_path, monkeypatch, capsys):
    out = tmp_path / "folded"
    code, _, err = run_main(monkeypatch, capsys, "export", checkpoints["retrieve"], "--to", "merged", "-o", out,
                            "--device", "cpu")
    assert code == 1 and "holds 3 side memories" in error_line(err) and "--memory" in err
    assert not leftovers(tmp_path, "folded")
    code, stdout, err = run_main(monkeypatch, capsys, "export", checkpoints["retrieve"], "--to", "merged", "-o", out,
                                 "--memory", "1", "--device", "cpu", "--json")
    assert code == 0, err
    cost = json.loads(stdout)["folding_cost"]
    assert json.loads(stdout)["memory"] == 1 and cost["edits"]["n"] == 2  # memory 1 holds edits 3 and 4
    code, _, err = run_main(monkeypatch, capsys, "export", checkpoints["retrieve"], "--to", "merged", "-o", out,
                            "--memory", "7", "--device", "cpu", "--force")
    assert code == 1 and "memories 0..2" in error_line(err)


def test_export_never_overwrites_without_force_nor_what_it_did_not_write(checkpoints, tmp_path, monkeypatch, capsys):
    out = tmp_path / "folded"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    for extra in ([], ["--force"]):
        code, _, err = run_main(monkeypatch, capsys, "export", checkpoints["merge"], "--to", "merged", "-o", out,
                                "--device", "cpu", *extra)
        assert code == 1 and str(out) in error_line(err)
    assert (out / "notes.txt").read_text() == "precious"


def test_gguf_export_needs_a_base_that_came_from_a_gguf(checkpoints, tmp_path, monkeypatch, capsys):
    out = tmp_path / "model.gguf"
    code, _, err = run_main(monkeypatch, capsys, "export", checkpoints["merge"], "--to", "gguf", "-o", out,
                            "--device", "cpu")
    assert code == 1 and "did not come from one wise can find" in error_line(err)
    assert not out.exists() and not list(tmp_path.glob(".model.gguf.tmp-*"))
