"""A patched checkpoint loaded by plain transformers: never the unedited model silently.

Without ``trust_remote_code`` transformers stops with its own error; with it, the model it
builds from ``modeling_wise.py`` (written beside the weights, no wisecli needed) routes
exactly as ``wise`` does: the same logits, routes and generations.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, pipeline

from wisecli.batching import encode_pairs
from wisecli.app.pipeline import EditOptions, edit
from wisecli.app.session import open_model
from wisecli.runtime.router import NO_MEMORY

from conftest import EDITS, write_jsonl
from wise_support import ARCHS, arch_dir

pytestmark = pytest.mark.usefixtures("single_thread")

LEARN = {"learning_rate": 0.5, "replay_weight": 0.15, "max_steps": 60, "mask_ratio": 0.5, "n_prefixes": 2,
         "n_negatives": 4, "negative_lengths": [4], "negatives_per_step": 4}
PROMPTS = [e["prompt"] for e in EDITS] + ["who plays music in the big city", "the capital of spain is",
                                          "the green lake and the small mountain"]


@pytest.fixture(scope="module", params=ARCHS)
def patched(request, tmp_path_factory) -> dict[str, Path]:
    """The three test edits in a tiny model: an embedded and a patch-only checkpoint."""
    d = tmp_path_factory.mktemp(f"hf-{request.param}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WISE_CACHE", str(d / "cache"))
        (d / "learn.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in LEARN.items()))
        edits = write_jsonl(d / "edits.jsonl", EDITS)
        options = EditOptions(config_file=str(d / "learn.yaml"), evaluate=False, device="cpu")
        edit(str(arch_dir(request, request.param)), edits, d / "patched", options)
        edit(str(arch_dir(request, request.param)), edits, d / "patch-only",
             EditOptions(**{**options.__dict__, "patch_only": True}))
        yield {"embedded": d / "patched", "patch_only": d / "patch-only"}


def _batch_logits(model, tok, texts: list[str]) -> torch.Tensor:
    batch = encode_pairs(tok, texts, [None] * len(texts))
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids).logits


def test_plain_transformers_refuses_a_patched_directory(patched):
    for load in (AutoModelForCausalLM.from_pretrained, AutoConfig.from_pretrained):
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            load(str(patched["embedded"]))


@pytest.mark.parametrize("kind", ["embedded", "patch_only"])
def test_remote_code_routes_exactly_as_wise(patched, kind):
    sess = open_model(str(patched[kind]), device="cpu")
    want = _batch_logits(sess.model, sess.tokenizer, PROMPTS)
    routes = sess.mem.last_route.tolist()
    assert NO_MEMORY in routes and any(r != NO_MEMORY for r in routes)  # both kinds of prompt
    model = AutoModelForCausalLM.from_pretrained(str(patched[kind]), trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(str(patched[kind]), trust_remote_code=True)
    got = _batch_logits(model, tok, PROMPTS)
    assert torch.equal(got, want)
    assert model.get_submodule(sess.target.module_path).last_route.tolist() == routes
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True, return_token_type_ids=False)
    kwargs = dict(do_sample=False, max_new_tokens=4, min_new_tokens=4, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        assert torch.equal(model.generate(**enc, **kwargs), sess.model.generate(**enc, **kwargs))


def test_remote_code_model_works_in_a_pipeline_and_refuses_save_pretrained(patched, tmp_path):
    pipe = pipeline("text-generation", model=str(patched["embedded"]), trust_remote_code=True)
    sess = open_model(str(patched["embedded"]), device="cpu")
    enc = sess.tokenizer([EDITS[0]["prompt"]], return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        ids = sess.model.generate(**enc, do_sample=False, max_new_tokens=3, min_new_tokens=3,
                                  pad_token_id=sess.tokenizer.pad_token_id)
    want = sess.tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    out = pipe(EDITS[0]["prompt"], max_new_tokens=3, min_new_tokens=3, do_sample=False, return_full_text=False)
    assert out[0]["generated_text"] == want
    with pytest.raises(NotImplementedError, match="trust_remote_code=True"):
        pipe.model.save_pretrained(tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def test_remote_code_needs_no_wisecli(patched, tmp_path):
    """In a process where ``import wisecli`` fails, the checkpoint still loads and gives the
    same logits as wise."""
    script = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "wisecli" or name.startswith("wisecli."):
            raise ImportError("wisecli is not installed here")
sys.meta_path.insert(0, Block())
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = {str(patched["embedded"])!r}
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
tok.padding_side = "left"
enc = tok({PROMPTS!r}, return_tensors="pt", padding=True, return_token_type_ids=False)
pos = (enc["attention_mask"].cumsum(-1) - 1).clamp_min(0)
with torch.no_grad():
    logits = model(**enc, position_ids=pos).logits
torch.save(logits, {str(tmp_path / "logits.pt")!r})
assert not any(m == "wisecli" or m.startswith("wisecli.") for m in sys.modules)
"""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    sess = open_model(str(patched["embedded"]), device="cpu")
    assert torch.equal(torch.load(tmp_path / "logits.pt"), _batch_logits(sess.model, sess.tokenizer, PROMPTS))


@pytest.mark.parametrize("name", ["merge", "retrieve"])
def test_a_format_2_checkpoint_still_loads_with_the_code_it_was_written_with(name, tmp_path, monkeypatch):
    """0.4.1 wrote its own ``modeling_wise.py`` beside its weights: today's transformers runs
    it and gets what 0.4.1 gave (a checkpoint keeps the code of the release that wrote it)."""
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    ckpt = Path(__file__).parent / "data" / "compat-v2" / name
    expected = json.loads((ckpt.parent / f"expected-{name}.json").read_text())
    assert json.loads((ckpt / "wise.json").read_text())["format_version"] == 2
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    prompts = expected["prompts"]
    enc = tok(prompts, return_tensors="pt", padding=True, return_token_type_ids=False)
    with torch.no_grad():
        seqs = model.generate(**enc, do_sample=False, max_new_tokens=10, min_new_tokens=10,
                              pad_token_id=tok.pad_token_id)
    assert tok.batch_decode(seqs[:, enc["input_ids"].shape[1]:], skip_special_tokens=True) == expected["generations"]
