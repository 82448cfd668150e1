"""``wise serve`` as a real HTTP server on localhost, talked to with the real ``openai`` client.

The tiny model's tokenizer gets a chat template of its own so the chat endpoint is exercised
here; the real smollm2 run is in test_real.py.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from wisecli.app.pipeline import EditOptions, edit
from wisecli.app.session import open_model

from conftest import EDITS, write_jsonl

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.usefixtures("single_thread")

WISE = str(Path(sys.executable).parent / "wise")
LEARN = "learning_rate: 0.5\nreplay_weight: 0.15\nmax_steps: 60\nmask_ratio: 0.5\nn_prefixes: 2\n" \
        "n_negatives: 4\nnegative_lengths: [4]\nnegatives_per_step: 4\n"
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
OTHER = "who plays music in the big city"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(patched: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """``wise serve`` on a free port, once it answers; its /v1 URL."""
    port = _free_port()
    proc = subprocess.Popen([WISE, "serve", str(patched), "--port", str(port), "--device", "cpu", "--name", "tiny",
                             *extra], stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{url}/models", timeout=1)
            return proc, url
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None:
                pytest.fail(proc.stderr.read())
            time.sleep(0.1)
    pytest.fail("wise serve did not answer")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_dir):
    d = tmp_path_factory.mktemp("serve")
    base = d / "base"
    import shutil
    shutil.copytree(tiny_llama_dir, base)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
    (d / "learn.yaml").write_text(LEARN)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WISE_CACHE", str(d / "cache"))
        edit(str(base), write_jsonl(d / "edits.jsonl", EDITS), d / "patched",
             EditOptions(config_file=str(d / "learn.yaml"), evaluate=False, device="cpu"))
        proc, url = _serve(d / "patched")
        yield {"url": url, "proc": proc, "patched": d / "patched",
               "client": openai.OpenAI(base_url=url, api_key="-", max_retries=0)}
        if proc.poll() is None:
            proc.kill()


def _direct(patched: Path, prompt: str, n: int, chat: bool = False) -> str:
    """What wise itself generates greedily for the prompt."""
    sess = open_model(str(patched), device="cpu")
    tok = sess.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                   tokenize=False) if chat else prompt
    enc = tok([text], return_tensors="pt", return_token_type_ids=False, add_special_tokens=not chat)
    with torch.no_grad():
        out = sess.model.generate(**enc, do_sample=False, max_new_tokens=n, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_models_lists_the_served_model(server):
    assert [m.id for m in server["client"].models.list().data] == ["tiny"]


def test_completion_plain_and_streamed_carry_the_edit(server):
    client, prompt = server["client"], EDITS[0]["prompt"]
    want = _direct(server["patched"], prompt, 3)
    assert EDITS[0]["target_new"] in want
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want


def test_chat_uses_the_chat_template_plain_and_streamed(server):
    client, question = server["client"], EDITS[0]["prompt"]
    want = _direct(server["patched"], question, 4, chat=True)
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                       max_tokens=4, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    chunks = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                            max_tokens=4, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want


def test_concurrent_requests_each_get_their_own_routing(server):
    client = server["client"]
    prompts = [EDITS[0]["prompt"], OTHER, EDITS[2]["prompt"], OTHER, EDITS[0]["prompt"], "the capital of spain is"]
    want = {p: _direct(server["patched"], p, 3) for p in set(prompts)}

    def ask(p: str) -> str:
        return client.completions.create(model="tiny", prompt=p, max_tokens=3, temperature=0).choices[0].text
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        got = list(pool.map(ask, prompts))
    assert got == [want[p] for p in prompts]


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (json.dumps({"model": "tiny", "prompt": 5}).encode(), 400, "prompt"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "tiny", "prompt": "x", "temperature": 7}).encode(), 400, "temperature"),
    (json.dumps({"model": "other", "prompt": "x"}).encode(), 404, "model"),
    (json.dumps({"model": "tiny", "prompt": ""}).encode(), 400, "prompt"),
    (json.dumps({"model": "tiny", "prompt": ["the sea"] * 17}).encode(), 400, "prompt"),
    (json.dumps({"model": "tiny", "prompt": "the sea", "max_tokens": 300}).encode(), 400, "max_tokens"),
])
def test_a_malformed_request_gets_a_json_error_and_the_server_goes_on(server, body, status, param):
    request = urllib.request.Request(f"{server['url']}/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(request, timeout=30)
    assert exc.value.code == status
    error = json.loads(exc.value.read())["error"]
    assert error["message"] and error["type"] and (param is None or error["param"] == param)
    assert server["client"].models.list().data  # still serving


def test_health_and_metrics_report_the_server(server):
    client, base = server["client"], server["url"].removesuffix("/v1")
    health = json.loads(urllib.request.urlopen(f"{base}/health", timeout=30).read())
    assert health == {"status": "ok", "queued_rows": 0, "running_rows": 0}
    client.completions.create(model="tiny", prompt=EDITS[0]["prompt"], max_tokens=3, temperature=0)
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line and not line.startswith("#")}
    assert samples['wise_requests_total{endpoint="completions",outcome="ok"}'] >= 1
    assert samples['wise_requests_total{endpoint="completions",outcome="invalid"}'] >= 1  # the malformed ones
    assert samples["wise_generation_tokens_total"] >= 3 and samples["wise_queue_rows"] == 0
    assert any(k.startswith('wise_memory_answers_total{memory="side[') for k in samples)
    assert samples["wise_request_duration_seconds_count"] >= 1
    assert "# TYPE wise_time_to_first_token_seconds histogram" in text


def test_streamed_and_plain_requests_batched_together_each_get_their_own_answer(server):
    client = server["client"]
    asks = [(EDITS[0]["prompt"], True, 3), (OTHER, False, 5), (EDITS[2]["prompt"], True, 4), (OTHER, True, 2),
            ("the capital of spain is", False, 6)]
    want = [_direct(server["patched"], p, n) for p, _, n in asks]

    def ask(a) -> str:
        prompt, stream, n = a
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, stream=stream)
        return "".join(c.choices[0].text for c in r) if stream else r.choices[0].text
    with ThreadPoolExecutor(max_workers=len(asks)) as pool:
        assert list(pool.map(ask, asks)) == want


@pytest.fixture(scope="module")
def small_server(server):
    """A second server on the same checkpoint with one row per batch and one place in the queue."""
    proc, url = _serve(server["patched"], "--max-batch", "1", "--max-queue", "1")
    url = url.removesuffix("/v1")
    yield url
    proc.kill()


def test_a_burst_past_the_queue_gets_clean_503s_and_the_rest_complete(small_server):
    body = json.dumps({"model": "tiny", "prompt": OTHER, "max_tokens": 200, "temperature": 0}).encode()

    def one(_: int) -> str:
        req = urllib.request.Request(f"{small_server}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return f"ok {json.loads(r.read())['choices'][0]['finish_reason']}"
        except urllib.error.HTTPError as e:
            error = json.loads(e.read())["error"]
            return f"{e.code} {bool(e.headers.get('Retry-After'))} {error['type']}"
    with ThreadPoolExecutor(max_workers=12) as pool:
        got = list(pool.map(one, range(12)))
    assert set(got) <= {"ok length", "ok stop", "503 True server_busy"}, got
    assert "503 True server_busy" in got and any(g.startswith("ok") for g in got)
    metrics = urllib.request.urlopen(f"{small_server}/metrics", timeout=30).read().decode()
    assert f'wise_requests_total{{endpoint="completions",outcome="rejected"}} {got.count("503 True server_busy")}' in metrics


def test_the_load_benchmark_runs_bounded(server):
    """benchmarks/serve_load.py at a small size: every response complete and equal to its
    single-request output, a burst answered or refused cleanly, dropped streams counted."""
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"
    res = subprocess.run([sys.executable, str(bench), str(server["patched"]), "--clients", "3", "--requests", "6",
                          "--tokens", "5", "--max-queue", "4", "--burst", "--disconnect"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    figures = json.loads(res.stdout)
    assert figures["complete"] == "6/6" and figures["unexplained"] == 0 and figures["chat"]
    assert set(figures["burst"]) <= {"ok", "503+retry-after"} and figures["burst"].get("ok", 0) >= 1
    assert figures["disconnect"]["then_answers"] and figures["disconnect"]["counted_disconnected"] == 3
    assert figures["throughput_x"] > 0


def test_sigterm_stops_the_server_cleanly(server):
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def test_a_port_in_use_is_a_one_line_error(tiny_llama_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = subprocess.run([WISE, "serve", str(tiny_llama_dir), "--port", str(port), "--device", "cpu"],
                             capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert f"error: 127.0.0.1:{port}: cannot listen there" in res.stderr
