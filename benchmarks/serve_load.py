"""``wise serve`` under load: N concurrent openai clients against the same requests one by one.

    python benchmarks/serve_load.py demo-out/patched --clients 8 --requests 32 --tokens 32
    python benchmarks/serve_load.py demo-out/patched --clients 16 --requests 48 --burst --disconnect
    python benchmarks/serve_load.py demo-out/patched --clients 8 --soak 600   # memory over repeated bursts

The requests mix short and long prompts, plain and chat, streamed and not, greedy and
sampled with a seed.  It runs them one after another (each request's reference output and
latency alone), then from N clients at once, and prints throughput against the serial run,
p50/p95 latency, time to first token, and how many responses are complete and equal to
their single-request output.  A greedy difference is traced: the request is generated alone
in this process and the margin between the two best logits where the texts part is printed
(a near-tie that batched arithmetic flips, or not).  ``--burst`` sends more requests at once
than the queue holds (they must get clean 503s with Retry-After, the rest complete);
``--disconnect`` drops streams mid-way (the server must go on and count them); ``--soak``
repeats bursts and samples the server's resident memory.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEAR_TIE = 0.01  # logit margin under which float arithmetic of another batch shape may flip the choice


@dataclass
class Ask:
    prompt: str
    chat: bool
    stream: bool
    temperature: float = 0.0
    seed: int | None = None


@dataclass
class Answer:
    text: str = ""
    finish: str | None = None
    seconds: float = 0.0
    first_token: float | None = None
    error: str | None = None


def requests(n: int, chat: bool) -> list[Ask]:
    """Mixed prompt lengths: one fact, a fact after a paragraph of others, a question."""
    edits = [json.loads(l)["prompt"] for l in (ROOT / "examples" / "edits.jsonl").read_text().splitlines()]
    other = (ROOT / "wisecli" / "app" / "data" / "unrelated.txt").read_text().splitlines()
    asks = []
    for i in range(n):
        short = (edits + other)[i % (len(edits) + len(other))]
        prompt = short if i % 3 else " ".join(other[(i + k) % len(other)] + " something." for k in range(6)) + " " + short
        sampled = i % 4 == 3
        asks.append(Ask(prompt, chat and i % 2 == 1, (i // 2) % 2 == 1, 0.8 if sampled else 0.0, i if sampled else None))
    return asks


def ask(client, model: str, a: Ask, tokens: int) -> Answer:
    t0, out = time.perf_counter(), Answer()
    kw = dict(model=model, max_tokens=tokens, temperature=a.temperature, seed=a.seed, stream=a.stream)
    try:
        if a.chat:
            r = client.chat.completions.create(messages=[{"role": "user", "content": a.prompt}], **kw)
        else:
            r = client.completions.create(prompt=a.prompt, **kw)
        if not a.stream:
            c = r.choices[0]
            out.text, out.finish = (c.message.content if a.chat else c.text), c.finish_reason
        else:
            for chunk in r:
                c = chunk.choices[0]
                piece = (c.delta.content if a.chat else c.text) or ""
                if piece and out.first_token is None:
                    out.first_token = time.perf_counter() - t0
                out.text += piece
                out.finish = c.finish_reason or out.finish
    except Exception as exc:  # counted, not fatal: the figures say how many failed
        out.error = f"{type(exc).__name__}: {exc}"
    out.seconds = time.perf_counter() - t0
    return out


def serial(client, model: str, asks: list[Ask], tokens: int) -> tuple[float, list[Answer]]:
    ask(client, model, asks[0], tokens)  # warm-up
    t0 = time.perf_counter()
    answers = [ask(client, model, a, tokens) for a in asks]
    return time.perf_counter() - t0, answers


def concurrent(url: str, model: str, asks: list[Ask], tokens: int, clients: int) -> tuple[float, list[Answer]]:
    from openai import OpenAI
    pool_clients = [OpenAI(base_url=url, api_key="-", max_retries=0, timeout=600) for _ in range(clients)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        answers = list(pool.map(lambda ia: ask(pool_clients[ia[0] % clients], model, ia[1], tokens),
                                enumerate(asks)))
    return time.perf_counter() - t0, answers


def compare(asks: list[Ask], alone: list[Answer], loaded: list[Answer]) -> dict:
    """Complete and equal to the single-request output; which greedy rows differ."""
    complete = sum(a.error is None and a.finish in ("stop", "length") for a in loaded)
    differ = [i for i, (x, y) in enumerate(zip(alone, loaded)) if (x.text, x.finish) != (y.text, y.finish)]
    return {"complete": f"{complete}/{len(asks)}", "equal": f"{len(asks) - len(differ)}/{len(asks)}",
            "differ": differ, "errors": [a.error for a in loaded if a.error][:3]}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def trace(model_dir: str, a: Ask, served: str, tokens: int, device: str) -> float | None:
    """The two best logits' margin where the request, generated alone in this process, parts
    from what the loaded server wrote (None: they do not part within ``tokens``)."""
    import torch

    import wisecli
    model, tok = wisecli.load(model_dir, device=device)
    text = tok.apply_chat_template([{"role": "user", "content": a.prompt}], add_generation_prompt=True,
                                   tokenize=False) if a.chat else a.prompt
    enc = tok([text], return_tensors="pt", add_special_tokens=not a.chat, return_token_type_ids=False).to(device)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=tokens, pad_token_id=tok.pad_token_id,
                             output_scores=True, return_dict_in_generate=True)
    new = out.sequences[0, enc["input_ids"].shape[1]:].tolist()
    for k in range(len(new)):
        if not served.startswith(tok.decode(new[:k + 1], skip_special_tokens=True)):
            top = torch.topk(out.scores[k][0].float(), 2).values
            return float(top[0] - top[1])
    return None


def burst(url: str, model: str, n: int) -> dict:
    """``n`` requests at once over plain HTTP: each is answered, or refused with 503 + Retry-After."""
    body = json.dumps({"model": model, "prompt": "The capital of France is", "max_tokens": 8,
                       "temperature": 0}).encode()

    def one(_: int) -> str:
        req = urllib.request.Request(f"{url}/completions", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                return "ok" if json.loads(r.read())["choices"][0]["finish_reason"] else "broken"
        except urllib.error.HTTPError as e:
            return "503+retry-after" if e.code == 503 and e.headers.get("Retry-After") else f"http {e.code}"
        except OSError as e:
            return f"lost: {e}"
    with ThreadPoolExecutor(max_workers=n) as pool:
        got = list(pool.map(one, range(n)))
    return {k: got.count(k) for k in sorted(set(got))}


def disconnect(url: str, model: str, n: int, tokens: int) -> dict:
    """``n`` streams dropped after their first piece: the server must free their rows and go on."""
    from openai import OpenAI
    client = OpenAI(base_url=url, api_key="-", max_retries=0, timeout=600)

    def one(i: int) -> None:
        stream = client.completions.create(model=model, prompt=f"Count to a hundred: {i},", max_tokens=tokens,
                                           temperature=0, stream=True)
        next(iter(stream))
        stream.response.close()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=n) as pool:
        list(pool.map(one, range(n)))
    while json.loads(urllib.request.urlopen(url.removesuffix("/v1") + "/health").read())["running_rows"]:
        time.sleep(0.05)
    idle = time.perf_counter() - t0
    after = ask(client, model, Ask("The capital of France is", False, False), 4)
    return {"dropped": n, "idle_after_seconds": round(idle, 2), "then_answers": after.error is None,
            "counted_disconnected": _metric(url, 'outcome="disconnected"')}


def soak(url: str, model: str, pid: int, seconds: float, clients: int, tokens: int) -> dict:
    """Bursts of ``clients`` requests for ``seconds``; the server's resident memory at each."""
    import psutil
    proc, asks, rss = psutil.Process(pid), requests(clients, chat=False), []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        concurrent(url, model, asks, tokens, clients)
        rss.append(proc.memory_info().rss / 2**20)
    return {"bursts": len(rss), "rss_mb_first": round(rss[0], 1), "rss_mb_last": round(rss[-1], 1),
            "rss_mb_max": round(max(rss), 1), "rss_growth_mb": round(rss[-1] - rss[0], 1)}


def _metric(url: str, label: str) -> float:
    text = urllib.request.urlopen(url.removesuffix("/v1") + "/metrics").read().decode()
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if label in l and not l.startswith("#"))


def start(model: str, device: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    wise = str(Path(sys.executable).parent / "wise")
    proc = subprocess.Popen([wise, "serve", model, "--port", str(port), "--device", device, "--name", "m", *extra],
                            stderr=subprocess.DEVNULL)
    for _ in range(1200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc, f"http://127.0.0.1:{port}/v1"
        except OSError:
            if proc.poll() is not None:
                sys.exit("the server did not start")
            time.sleep(0.1)
    sys.exit("the server did not answer")


def load_figures(args: argparse.Namespace, url: str) -> dict:
    from openai import OpenAI
    client = OpenAI(base_url=url, api_key="-", max_retries=0, timeout=600)
    chat = ask(client, "m", Ask("Hi", True, False), 1).error is None
    asks = requests(args.requests, chat)
    serial_s, alone = serial(client, "m", asks, args.tokens)
    loaded_s, loaded = concurrent(url, "m", asks, args.tokens, args.clients)
    single = statistics.median(a.seconds for a in alone)
    lat = [a.seconds for a in loaded]
    ttft = [a.first_token for a in loaded if a.first_token is not None]
    return {"clients": args.clients, "requests": len(asks), "tokens": args.tokens, "chat": chat,
            "serial_seconds": round(serial_s, 2), "concurrent_seconds": round(loaded_s, 2),
            "throughput_x": round(serial_s / loaded_s, 2), "single_median_seconds": round(single, 3),
            "p50_seconds": round(percentile(lat, 0.5), 3), "p95_seconds": round(percentile(lat, 0.95), 3),
            "p95_over_single": round(percentile(lat, 0.95) / single, 2),
            "p95_over_alone_p95": round(percentile(lat, 0.95) / percentile([a.seconds for a in alone], 0.95), 2),
            "ttft_p50_seconds": round(percentile(ttft, 0.5), 3) if ttft else None,
            **compare(asks, alone, loaded), "_asks": asks, "_loaded": loaded}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, help="requests in the mix (default: 4 per client)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--burst", action="store_true", help="also send more requests at once than the queue holds")
    ap.add_argument("--disconnect", action="store_true", help="also drop streams mid-way")
    ap.add_argument("--soak", type=float, default=0, help="also repeat bursts for this many seconds")
    args = ap.parse_args()
    args.requests = args.requests or 4 * args.clients
    max_batch = max(16, args.clients)
    proc, url = start(args.model, args.device, ["--max-batch", str(max_batch), "--max-queue", str(args.max_queue)])
    try:
        figures = load_figures(args, url)
        if args.burst:
            figures["burst"] = burst(url, "m", max_batch + args.max_queue + 16)
        if args.disconnect:
            figures["disconnect"] = disconnect(url, "m", min(args.clients, max_batch), 200)
        if args.soak:
            figures["soak"] = soak(url, "m", proc.pid, args.soak, args.clients, args.tokens)
        figures["metrics_requests_ok"] = _metric(url, 'outcome="ok"')
        figures["mean_batch_rows"] = round(_metric(url, "wise_batch_rows_sum") / max(1, _metric(url, "wise_batch_rows_count")), 2)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    asks, loaded = figures.pop("_asks"), figures.pop("_loaded")
    figures["differ"] = [{"request": i, "greedy": asks[i].temperature == 0,
                          "margin": trace(args.model, asks[i], loaded[i].text, args.tokens, args.device)
                          if asks[i].temperature == 0 else None} for i in figures["differ"]]
    figures["unexplained"] = sum(not (d["greedy"] and d["margin"] is not None and d["margin"] < NEAR_TIE)
                                 for d in figures["differ"])
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
