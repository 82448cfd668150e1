"""The Python API (``wisecli.load / edit / evaluate``) on a tiny model: the same pipeline
and figures as the CLI, and a loaded model that works with transformers' own tools."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import pipeline

import wisecli
from wisecli.app.edits import load_edits

from conftest import EDITS, write_jsonl

pytestmark = pytest.mark.usefixtures("single_thread", "wise_cache")

CONFIG = "learning_rate: 0.5\nreplay_weight: 0.15\nmax_steps: 60\nmask_ratio: 0.5\nn_prefixes: 2\n" \
         "n_negatives: 4\nnegative_lengths: [4]\nnegatives_per_step: 4\n"


@pytest.fixture
def run(tiny_llama_dir, tmp_path):
    (tmp_path / "learn.yaml").write_text(CONFIG)
    edits = write_jsonl(tmp_path / "edits.jsonl", EDITS)
    result = wisecli.edit(tiny_llama_dir, edits, tmp_path / "patched", config_file=str(tmp_path / "learn.yaml"),
                          device="cpu")
    return result, edits, tmp_path / "patched"


def test_edit_writes_what_wise_edit_writes(run):
    result, edits, out = run
    summary = result.summary()
    assert summary["n_edits"] == len(EDITS) and summary["output"] == str(out)
    manifest = json.loads((out / "wise.json").read_text())
    assert [e["id"] for e in manifest["edits"]] == [e["id"] for e in EDITS]
    assert manifest["metrics"]["reliability"] == result.report.reliability


def test_load_gives_a_model_with_its_edits_for_generate_and_pipelines(run, tmp_path):
    result, edits, out = run
    model, tok = wisecli.load(out, device="cpu")
    prompts = [EDITS[0]["prompt"], "who plays music in the big city"]  # two lengths: padding
    enc = tok(prompts, return_tensors="pt", padding=True, return_token_type_ids=False)
    assert (enc["attention_mask"] == 0).any()
    with torch.no_grad():
        ids = model.generate(**enc, do_sample=False, max_new_tokens=3, min_new_tokens=3, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    out_pipe = pipe(prompts, max_new_tokens=3, min_new_tokens=3, do_sample=False, return_full_text=False)
    assert [o[0]["generated_text"] for o in out_pipe] == texts
    with torch.no_grad():  # the first prompt goes through the side memory, as in wise
        model(**tok(prompts[:1], return_tensors="pt", return_token_type_ids=False))
    layer = next(m for m in model.modules() if type(m).__name__ == "SideMemoryLayer")
    assert layer.last_route.tolist() == [0]
    with pytest.raises(NotImplementedError, match="save_pretrained"):
        model.save_pretrained(tmp_path / "copy")


def test_evaluate_gives_the_cli_figures(run):
    result, edits, out = run
    by_path = wisecli.evaluate(out, edits, device="cpu")
    model, tok = wisecli.load(out, device="cpu")
    by_model = wisecli.evaluate(model, load_edits(edits), tokenizer=tok)
    for key in ("reliability", "generalization", "locality", "generated_accuracy"):
        assert getattr(by_path, key) == getattr(by_model, key) == getattr(result.report, key), key
    with pytest.raises(TypeError, match="tokenizer"):
        wisecli.evaluate(model, edits)


def test_version_needs_no_torch():
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-c", "import sys, wisecli; print(wisecli.__version__, 'torch' in sys.modules)"],
                         capture_output=True, text=True, timeout=60)
    assert res.stdout.split() == [wisecli.__version__, "False"]
