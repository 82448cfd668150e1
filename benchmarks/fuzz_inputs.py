"""Malformed inputs for the readers of edit files, configs and patched checkpoints.

    python benchmarks/fuzz_inputs.py --edits 10000 --configs 2000 --checkpoints 600

Prints, per category, how many inputs were accepted, refused and mishandled, with examples
of the mishandled.  The tests run the same generators on a bounded, seeded budget
(tests/test_fuzz.py).  Each generator yields ``(label, bytes)``; ``verdict``
says whether a reader handled an input: it either accepted it (and what it returned is
sound) or refused it with a one-line ``WiseError``.  Anything else -- another exception, a
multi-line or runaway message, a hang, or a silently unsound result -- is "mishandled".
"""
from __future__ import annotations

import json
import math
import random
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from wisecli.errors import WiseError

MAX_MESSAGE = 600   # characters: a message that long is a dump, not a message
TIME_LIMIT = 10     # seconds per input: longer is a hang

_VALID = {"id": "e1", "prompt": "The capital of France is", "target_new": "Rome",
          "rephrase": ["France's capital is"], "locality_prompt": "The capital of Spain is",
          "locality_ground_truth": "Madrid", "subject": "France"}
_WEIRD_STRINGS = ["", " ", "\u0000", "\ud800", "\udfff", "a\ud83d", "\u2028", "\ufeff", "x" * 100_000,
                  "\x1b[31mred\x1b[0m", "[red]markup[/red]", "{}", "é", "日本", "\n\n"]


def _weird_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(12)
    if kind == 0:
        return rng.choice(_WEIRD_STRINGS)
    if kind == 1:
        return rng.choice([0, -1, 2 ** 63, -(2 ** 64), 10 ** 5000 if rng.random() < 0.3 else 10 ** 30])
    if kind == 2:
        return rng.choice([float("nan"), float("inf"), -float("inf"), 1e308, -0.0, 0.5])
    if kind == 3:
        return rng.choice([True, False, None])
    if kind == 4 and depth < 3:
        return [_weird_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 5 and depth < 3:
        return {rng.choice(list(_VALID) + ["", "x"]): _weird_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    if kind == 6:
        return _nested(rng.choice([50, 5_000, 100_000]), rng.choice(["[", "{"]))
    return rng.choice(["ok text", "Paris", "The capital of X is"])


class _Raw(str):
    """A JSON fragment to splice in as it is (deep nesting, huge numbers)."""


def _nested(depth: int, bracket: str) -> _Raw:
    if bracket == "[":
        return _Raw("[" * depth + "]" * depth)
    return _Raw('{"a":' * depth + "1" + "}" * depth)


def _dump(value: Any) -> str:
    """json.dumps that keeps NaN/Infinity (as Python writes them) and splices raw fragments."""
    if isinstance(value, _Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {_dump(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_dump(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)  # lone surrogates survive as \\ud800 escapes
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10 ** 4000:
        return "1" + "0" * 5000
    return json.dumps(value)


def edit_files(rng: random.Random) -> Iterator[tuple[str, str, bytes]]:
    """(label, suffix, content) of malformed (and some valid) edit files, forever."""
    while True:
        kind = rng.randrange(10)
        record = dict(_VALID)
        if kind <= 4:  # a field of our schema gets a weird value, or goes missing
            for _ in range(rng.randrange(1, 4)):
                key = rng.choice(list(_VALID) + ["portability", "ground_truth"])
                if rng.random() < 0.2:
                    record.pop(key, None)
                else:
                    record[key] = _weird_value(rng)
            lines = [_dump(record)] * rng.randrange(1, 3)
            yield "jsonl-field", ".jsonl", ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")
        elif kind == 5:  # a whole line replaced
            line = _dump(_weird_value(rng))
            yield "jsonl-line", ".jsonl", (line + "\n").encode("utf-8", "surrogatepass")
        elif kind == 6:  # EasyEdit-family lists with weird nesting
            fmt = rng.choice([{"src": 0, "alt": 0, "rephrase": 0, "loc": 0, "loc_ans": 0},
                              {"prompt": 0, "target_new": 0, "locality": 0, "portability": 0},
                              {"text": 0, "labels": 0, "concept": 0}])
            items = [{k: _weird_value(rng) for k in fmt} for _ in range(rng.randrange(1, 3))]
            yield "json-list", ".json", _dump(items).encode("utf-8", "surrogatepass")
        elif kind == 7:  # bytes: truncation, invalid UTF-8, NUL, BOM
            good = (_dump(_VALID) + "\n").encode()
            cut = rng.randrange(len(good))
            blob = rng.choice([good[:cut], good[:cut] + b"\xff\xfe" + good[cut:], b"\x00" * 10,
                               b"\xef\xbb\xbf" + good, good.replace(b"\n", b"\r\n"), b"\xc3\x28" + good])
            yield "bytes", ".jsonl", blob
        elif kind == 8:  # deep nesting of a whole file
            yield "nesting", rng.choice([".jsonl", ".json"]), str(_nested(rng.choice([1000, 100_000]),
                                                                         rng.choice(["[", "{"]))).encode()
        else:  # valid files, so "accepted" is exercised too
            yield "valid", ".jsonl", (_dump(_VALID) + "\n").encode()


_CONFIG_KEYS = ["mode", "learning_rate", "max_steps", "seed", "key_gate", "prefix_lengths", "layer",
                "weight_decay", "n_negatives", "score_pooling", "subject_gate", "edits_per_memory"]
_YAML_VALUES = ["abc", "1", "-1", "0", "1.5", ".inf", "-.inf", ".nan", "1e400", "18446744073709551616",
                "99999999999999999999999999999", "[1, 2]", "[]", "{a: 1}", "null", "~", "true", "yes",
                "!!int abc", "!!bool ''", "!!timestamp abc", "!!float x", "!!python/object:os.system ls",
                "!!binary abc", "'\\ud800'", '"\\ud800"', "&a 1", "*a", "[[[[[[[[[[1]]]]]]]]]]", "2001-12-14"]


def config_files(rng: random.Random) -> Iterator[tuple[str, str, bytes]]:
    """(label, suffix, content) of malformed (and some valid) YAML configs, forever."""
    while True:
        kind = rng.randrange(8)
        if kind <= 3:
            lines = [f"{rng.choice(_CONFIG_KEYS)}: {rng.choice(_YAML_VALUES)}" for _ in range(rng.randrange(1, 4))]
            yield "values", ".yaml", ("\n".join(lines) + "\n").encode()
        elif kind == 4:  # alias bombs, small and large
            n = rng.choice([3, 6, 9])
            rows = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + \
                [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, n)]
            if rng.random() < 0.6:  # ... and used where a value is read
                rows = [f"  {r}" for r in rows]
                rows = ["_anchors:"] + rows + [f"{rng.choice(['prefix_lengths', 'seed', 'mode'])}: *a{n - 1}"]
            yield "bomb", ".yaml", ("\n".join(rows) + "\n").encode()
        elif kind == 5:  # structure: mixed key types, deep nesting, scalars, non-UTF-8
            yield "structure", ".yaml", rng.choice([b"1: x\nfoo: y\n", b"[" * 10_000 + b"]" * 10_000,
                                                    b"- a\n- b\n", b"42\n", b"\xff\xfe\x00m\x00", b"seed: \xe9\n",
                                                    b"{" * 5000 + b"}" * 5000, b"? [a, b]\n: 1\n", b"\t seed: 1\n",
                                                    b"seed: 1\nseed: 2\n", b"", b"---\n...\n---\nseed: 1\n"])
        elif kind == 6:
            yield "removed", ".yaml", rng.choice([b"ties_density: 1.0\n", b"ties_density: 0.5\n",
                                                  b"optimizer: adam\n", b"route_by: closest\n"])
        else:
            yield "valid", ".yaml", rng.choice([b"seed: 3\n", b"learning_rate: 2.5\nmax_steps: 40\n", b"{}\n"])


@contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    def expire(*_: Any) -> None:
        raise TimeoutError(f"took over {seconds} s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def verdict(call: Callable[[], Any], sound: Callable[[Any], str | None]) -> tuple[str, str]:
    """("accepted" | "refused" | "mishandled", detail).  ``sound(result)`` names what is wrong
    with an accepted result, or returns None."""
    try:
        with _time_limit(TIME_LIMIT):
            result = call()
    except WiseError as exc:
        text = str(exc) + (f" hint: {exc.hint}" if exc.hint else "")
        if "\n" in str(exc) or len(text) > MAX_MESSAGE:
            return "mishandled", f"message of {len(text)} chars / {str(exc).count(chr(10)) + 1} lines"
        return "refused", str(exc)[:120]
    except Exception as exc:  # noqa: BLE001 - the point is to catch what slipped through
        return "mishandled", f"{type(exc).__name__}: {str(exc)[:200]}"
    try:
        problem = sound(result)
    except Exception as exc:  # noqa: BLE001 - accepted, then broke when used
        problem = f"accepted, then {type(exc).__name__} when used: {str(exc)[:160]}"
    return ("mishandled", problem) if problem else ("accepted", "")


def sound_records(records: Any) -> str | None:
    for r in records:
        for value in (r.id, r.prompt, r.target_new, *r.rephrase, r.locality_prompt, r.subject):
            if value is None:
                continue
            if not isinstance(value, str):
                return f"a field came back as {type(value).__name__}"
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return "a string that cannot be written as UTF-8"
    return None


def sound_config(cfg: Any) -> str | None:
    import dataclasses
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            return f"{f.name} accepted as {value}"
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2 ** 32:
            return f"{f.name} accepted as {value}"
    return None


# ---- patched checkpoints -------------------------------------------------------------------

def _json_paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside a manifest (the long lists sampled, not walked whole)."""
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _json_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:3]):
            out += _json_paths(v, prefix + (i,))
    return out


def _set(obj: Any, path: tuple, value: Any, delete: bool = False) -> None:
    for key in path[:-1]:
        obj = obj[key]
    if delete and isinstance(obj, dict):
        obj.pop(path[-1], None)
    elif delete and isinstance(obj, list):
        obj.pop(path[-1])
    else:
        obj[path[-1]] = value


def mutate_checkpoint(rng: random.Random, good: Path, out: Path) -> str:
    """Copy ``good`` to ``out`` with one thing broken; returns the category."""
    import shutil

    import safetensors.torch
    import torch
    shutil.copytree(good, out)
    manifest = json.loads((out / "wise.json").read_text())
    tensors = safetensors.torch.load_file(str(out / "wise.safetensors"))
    kind = rng.randrange(10)
    if kind <= 3:  # a manifest value
        path = rng.choice(_json_paths(manifest))
        _set(manifest, path, _weird_value(rng), delete=rng.random() < 0.4)
        text = _dump(manifest)
        (out / "wise.json").write_bytes(text.encode("utf-8", "surrogatepass"))
        return "manifest"
    if kind <= 6:  # a tensor, consistent with the manifest or not
        name = rng.choice(sorted(tensors))
        t = tensors[name]
        change = rng.randrange(5)
        if change == 0:
            del tensors[name]
        elif change == 1 and t.is_floating_point() and t.numel():
            t = t.clone()
            t.view(-1)[rng.randrange(t.numel())] = rng.choice([float("nan"), float("inf")])
            tensors[name] = t
        elif change == 2 and t.dtype == torch.long and t.numel():
            t = t.clone()
            t.view(-1)[0] = rng.choice([-5, 10 ** 6])
            tensors[name] = t
        elif change == 3:
            tensors[name] = torch.zeros(*[s + rng.choice([0, 1, 2]) for s in t.shape] or [1], dtype=t.dtype)
        else:
            tensors[name] = t[:0] if t.dim() else t
        if rng.random() < 0.7:  # keep the manifest's tensor list in step, as a careful forger would
            manifest["tensors"] = {n: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                                   for n, v in tensors.items()}
        safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "wise.safetensors"))
        (out / "wise.json").write_text(json.dumps(manifest))
        return "tensors"
    wj, ws = out / "wise.json", out / "wise.safetensors"
    change = rng.randrange(6)
    if change == 0:
        wj.unlink()
    elif change == 1:
        wj.unlink()
        wj.mkdir()
    elif change == 2:
        wj.unlink()
        wj.symlink_to(wj.name)  # a loop
    elif change == 3:
        data = bytearray(ws.read_bytes())
        for _ in range(64):
            data[rng.randrange(len(data) // 2, len(data))] ^= 0xFF
        ws.write_bytes(bytes(data))
    elif change == 4:
        ws.write_bytes(ws.read_bytes()[: rng.randrange(len(ws.read_bytes()))])
    else:
        (out / "wise.json").write_text('{"a":' * 100_000 + "1" + "}" * 100_000)
    return "files"


def sound_session(sess: Any) -> str | None:
    """A checkpoint that loads must route: its memories there, finite, and usable."""
    import torch
    from wisecli.batching import encode_pairs
    mem = sess.mem
    if sess.manifest and sess.manifest.get("edits") and mem.n_memories == 0:
        return "its edits loaded as no side memory"
    for name, t in mem.wise_state().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            return f"{name} holds NaN or Inf"
    batch = encode_pairs(sess.tokenizer, ["the capital of france is", "the queen lives in"], [None, None])
    with torch.no_grad():
        logits = sess.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids).logits
    return None if torch.isfinite(logits).all() else "logits are not finite"


# ---- the run ---------------------------------------------------------------------------------

def _run_files(gen: Iterator[tuple[str, str, bytes]], n: int, read: Callable[[str], Any],
               sound: Callable[[Any], str | None], tmp: Path) -> dict[str, Any]:
    counts: dict[str, dict[str, int]] = {}
    examples: list[str] = []
    for i in range(n):
        label, suffix, data = next(gen)
        path = tmp / f"input-{i}{suffix}"
        path.write_bytes(data)
        outcome, detail = verdict(lambda: read(str(path)), sound)
        counts.setdefault(label, {"accepted": 0, "refused": 0, "mishandled": 0})[outcome] += 1
        if outcome == "mishandled" and len(examples) < 12:
            examples.append(f"{label}: {detail}  <- {data[:80]!r}")
        path.unlink()
    return {"counts": counts, "examples": examples}


def _good_checkpoint(tmp: Path) -> Path:
    """A format-2 checkpoint: the format-1 test fixture edited once more."""
    from wisecli.app.pipeline import EditOptions, edit
    fixture = Path(__file__).resolve().parents[1] / "tests" / "data" / "compat-v1" / "merge"
    edits = tmp / "more.jsonl"
    edits.write_text(json.dumps({"prompt": "the blue river is in", "target_new": "spain", "subject": "river"}) + "\n")
    config = tmp / "small.yaml"
    config.write_text("n_prefixes: 2\nn_negatives: 6\nmax_steps: 10\nnull_space_rank: 4\nlearning_rate: 0.5\n"
                      "replay_weight: 0.15\n")
    edit(str(fixture), edits, tmp / "good", EditOptions(config_file=str(config), evaluate=False, device="cpu"))
    return tmp / "good"


def _run_checkpoints(rng: random.Random, n: int, tmp: Path) -> dict[str, Any]:
    import shutil

    from wisecli.app.session import open_model
    good = _good_checkpoint(tmp)
    counts: dict[str, dict[str, int]] = {}
    examples: list[str] = []
    for i in range(n):
        out = tmp / f"ckpt-{i}"
        label = mutate_checkpoint(rng, good, out)
        outcome, detail = verdict(lambda: open_model(str(out), device="cpu"), sound_session)
        counts.setdefault(label, {"accepted": 0, "refused": 0, "mishandled": 0})[outcome] += 1
        if outcome == "mishandled" and len(examples) < 12:
            examples.append(f"{label}: {detail}")
        shutil.rmtree(out, ignore_errors=True)
        if out.is_symlink() or out.exists():
            out.unlink()
    return {"counts": counts, "examples": examples}


def main() -> None:
    import argparse
    import os
    import tempfile

    from wisecli.methods.wise.config import load_config
    from wisecli.app.edits import load_edits
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", type=int, default=10_000)
    ap.add_argument("--configs", type=int, default=2_000)
    ap.add_argument("--checkpoints", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("WISE_CACHE", tempfile.mkdtemp(prefix="wise-fuzz-cache-"))
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        report = {"edits": _run_files(edit_files(rng), args.edits, load_edits, sound_records, tmp),
                  "configs": _run_files(config_files(rng), args.configs, lambda p: load_config(p, "llama"),
                                        sound_config, tmp)}
        if args.checkpoints:
            report["checkpoints"] = _run_checkpoints(rng, args.checkpoints, tmp)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for part, r in report.items():
        total = {k: sum(c[k] for c in r["counts"].values()) for k in ("accepted", "refused", "mishandled")}
        print(f"{part}: {total}  by kind: {r['counts']}")
        for ex in r["examples"]:
            print(f"    {ex}")


if __name__ == "__main__":
    main()
