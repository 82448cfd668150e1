"""Bytes of side-memory state per edit at a projection's shape, as a checkpoint stores it.

Builds the state ``wise edit``'s defaults leave after T edits (one memory per
``edits_per_memory``, ``keys_per_edit`` router keys per edit, the basis and the replay
factor) at the FFN output projection of a model it never loads, in the dtypes
``wise.safetensors`` stores (``memory.stored_state``), and in format 3's (float32 memories
and replay factor, float16 keys) beside it:

    python benchmarks/storage.py --shape llama-2-7b --T 1000 10000
    python benchmarks/storage.py --shape smollm2-135m --T 1000

The tensors are random (their bytes do not depend on their values); ``wise info`` gives
the figure of a real checkpoint.
"""
from __future__ import annotations

import argparse
import json

import torch

from wisecli.methods.wise.config import WiseConfig
from wisecli.runtime.maths import fp8_keys, from_fp8_keys
from wisecli.runtime.memory import stored_state

# FFN output projection (d_out, d_in) of each shape.
SHAPES = {"llama-2-7b": (4096, 11008), "llama-3-8b": (4096, 14336), "smollm2-135m": (576, 1536)}


def state(d_out: int, d_in: int, t: int, cfg: WiseConfig, full: bool) -> dict[str, torch.Tensor]:
    """The layer's buffers after ``t`` edits in merge mode (``full``: format 3's deltas)."""
    k = -(-t // cfg.edits_per_memory)
    m = t * cfg.keys_per_edit
    keys = torch.randn(m, d_in).half()
    tensors = {"thresholds": torch.ones(k), "min_edit_scores": torch.ones(k), "scale": torch.ones(()),
               "basis": torch.zeros(d_in, cfg.null_space_rank),
               "key_edit": torch.arange(m) // cfg.keys_per_edit, "key_memory": torch.zeros(m, dtype=torch.long),
               "replay_factor": torch.randn(d_in, min(cfg.replay_rank, d_in)).half().float(),
               "replay_count": torch.ones(())}
    # only the sizes are read: (k, d_out, d_in) would not fit in memory at T=10,000
    memories = torch.zeros(1, 1, 1).expand(k, d_out, d_in)
    if full:
        return {**tensors, "memories": memories, "edit_keys": keys}
    stored = stored_state({**tensors, "memories": torch.zeros(k, 1, 1), "edit_keys": from_fp8_keys(*fp8_keys(keys)).half()})
    return {**stored, "memories": memories.half()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-2-7b", choices=sorted(SHAPES))
    ap.add_argument("--T", type=int, nargs="+", default=[1000, 10000])
    args = ap.parse_args()
    cfg, (d_out, d_in) = WiseConfig(), SHAPES[args.shape]
    for t in args.T:
        row = {"shape": args.shape, "T": t}
        for name, full in (("format_3", True), ("stored", False)):
            tensors = state(d_out, d_in, t, cfg, full)
            parts = {n: v.numel() * v.element_size() for n, v in tensors.items()}
            size = sum(parts.values())  # what the file holds, less its header (a few KB)
            row[name] = {"bytes": size, "bytes_per_edit": size // t,
                         "largest": sorted(parts, key=parts.get, reverse=True)[:3]}
            del tensors
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
