"""Latency of ``wise serve`` against ``generate`` in process, on the same prompts, one run.

    python benchmarks/serve_latency.py demo-out/patched --tokens 20

Starts the server, then times greedy generation of each prompt in this process (the model
loaded by ``wisecli.load``), then the same requests over HTTP with the openai client.
Prints per-request medians and their ratio.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

import wisecli

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "edits.jsonl"


def _start(model: str, port: int, device: str) -> subprocess.Popen:
    wise = str(Path(sys.executable).parent / "wise")
    proc = subprocess.Popen([wise, "serve", model, "--port", str(port), "--device", device, "--name", "m"],
                            stderr=subprocess.DEVNULL)
    for _ in range(1200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1)
            return proc
        except OSError:
            if proc.poll() is not None:
                sys.exit("the server did not start")
            time.sleep(0.1)
    sys.exit("the server did not answer")


def _generate(model, tok, prompt: str, tokens: int) -> str:
    enc = tok([prompt], return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=tokens, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def _timed(prompts: list[str], run) -> tuple[list[float], list[str]]:
    """Seconds and text per prompt; the first prompt warms up and is dropped."""
    seconds, texts = [], []
    for p in prompts:
        t = time.perf_counter()
        texts.append(run(p))
        seconds.append(time.perf_counter() - t)
    return seconds[1:], texts[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    from openai import OpenAI
    prompts = [json.loads(line)["prompt"] for line in EXAMPLES.read_text().splitlines()]
    model, tok = wisecli.load(args.model, device=args.device)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _start(args.model, port, args.device)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
    try:
        # In blocks, not alternating: both processes share the CPU, and one's threads spin for
        # a while after its work ends, which would be charged to the other.
        direct, texts = _timed([prompts[0]] + prompts, lambda p: _generate(model, tok, p, args.tokens))
        served, replies = _timed([prompts[0]] + prompts, lambda p: client.completions.create(
            model="m", prompt=p, max_tokens=args.tokens, temperature=0).choices[0].text)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    same = sum(a == b for a, b in zip(texts, replies))
    d, s = statistics.median(direct), statistics.median(served)
    print(json.dumps({"prompts": len(prompts), "tokens": args.tokens, "direct_seconds": round(d, 4),
                      "served_seconds": round(s, 4), "ratio": round(s / d, 3),
                      "same_text": f"{same}/{len(prompts)}"}, indent=2))

if __name__ == "__main__":
    main()
