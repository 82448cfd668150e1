"""What ``wise bench`` measures, all in one run on the same prompts.

Ratios (speed-up, inference overhead, cost in forward passes) are the figures that
carry across machines; seconds are given beside them.
"""
from __future__ import annotations

import copy
import resource
import statistics
import time
from typing import Any, Callable

import torch

from wisecli.methods.wise.config import load_config
from wisecli.app.edits import EditRecord
from wisecli.methods.locate import set_module
from wisecli.app.session import Session
from wisecli.methods.wise.editor import EditorState, WiseEditor
from wisecli.runtime.memory import install, uninstall
from wisecli.app.bench.reference import reference_forward


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def measure_editing(sess: Session, edits: list[EditRecord], batch: int, mode: str,
                    compare_reference: bool, progress: Callable[[str], None],
                    config: str | None = None) -> dict[str, Any]:
    cfg = load_config(config, sess.target.model_type, {"mode": mode, "edits_per_shard": batch})
    editor = WiseEditor(sess.model, sess.tokenizer, sess.mem, sess.blocks, sess.target.layer, cfg)
    setup = _timed(editor.prepare, sess.device)
    out: dict[str, Any] = {"setup_seconds": round(setup, 3)}
    first = edits[:batch]
    if compare_reference:
        progress(f"reference loop (full forward and backward each step) on {len(first)} edits")
        fresh = editor.snapshot()
        reference = WiseEditor(sess.model, sess.tokenizer, sess.mem, sess.blocks, sess.target.layer, cfg,
                               EditorState.from_dict(copy.deepcopy(fresh[3])),
                               forward_factory=lambda b: reference_forward(sess.model, sess.mem, b))
        ref = _timed(lambda: reference.apply(first), sess.device)
        editor.rollback(fresh)
        fast_first = _timed(lambda: editor.apply(first), sess.device)
        editor.rollback(fresh)
        out["reference_seconds_per_edit"] = round(ref / len(first), 4)
        out["fast_seconds_per_edit_same_edits"] = round(fast_first / len(first), 4)
        out["speedup_vs_reference"] = round(ref / fast_first, 2)
    if sess.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(sess.device)
    progress(f"editing {len(edits)} edits in batches of {batch}")
    spent = _timed(lambda: editor.apply(edits), sess.device)
    out.update(seconds_per_edit=round(spent / len(edits), 4), edit_seconds=round(spent, 3),
               peak_memory_bytes=_peak_memory(sess.device), memories=sess.mem.n_memories)
    return out


def _toggle_memory(sess: Session, on: bool) -> None:
    """Swap the side-memory layer in or out, so the base is the unwrapped model."""
    if on:
        set_module(sess.model, sess.target.module_path, sess.mem)
        install(sess.model, sess.mem)
    else:
        uninstall(sess.model)
        set_module(sess.model, sess.target.module_path, sess.mem.base_layer)


def measure_inference(sess: Session, prompts: list[str], reps: int, new_tokens: int = 20) -> dict[str, Any]:
    """Patched against base, interleaved so drift of the machine hits both alike."""
    tok, model, dev = sess.tokenizer, sess.model, sess.device
    enc = tok(prompts, return_tensors="pt", padding=True).to(dev)
    one = tok(prompts[:1], return_tensors="pt").to(dev)

    def forward(e: dict) -> None:
        with torch.no_grad():
            model(**e, use_cache=False)

    def generate() -> None:
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=tok.pad_token_id)

    def measure(on: bool, what: Callable[[], None]) -> float:
        if not on:
            _toggle_memory(sess, False)
        try:
            return _timed(what, dev)
        finally:
            if not on:
                _toggle_memory(sess, True)

    times: dict[str, list[float]] = {k: [] for k in ("fwd_base", "fwd_patched", "gen_base", "gen_patched")}
    # A forward pass is cheap next to a generation, so it gets five times the rounds: the
    # overhead is a difference of a few percent on a machine whose timings jitter as much.
    for name, what, rounds in (("fwd", lambda: forward(enc), 5 * reps), ("gen", generate, reps)):
        for i in range(rounds + 1):  # the first round warms up and is not counted
            # Alternate which goes first, so a cache or clock that favours the second run
            # of a pair favours each side equally.
            order = ((False, "base"), (True, "patched"))
            for on, key in (order if i % 2 else order[::-1]):
                t = measure(on, what)
                if i:
                    times[f"{name}_{key}"].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    fwd_one = statistics.median(_timed(lambda: forward(one), dev) for _ in range(max(5, reps)))
    return {
        "forward_seconds": round(fwd_one, 5),
        "inference_overhead": round(med["fwd_patched"] / med["fwd_base"] - 1, 4),
        "generation_overhead": round(med["gen_patched"] / med["gen_base"] - 1, 4),
        "forward_base_seconds": round(med["fwd_base"], 5), "forward_patched_seconds": round(med["fwd_patched"], 5),
        "generate_base_seconds": round(med["gen_base"], 4), "generate_patched_seconds": round(med["gen_patched"], 4),
    }
