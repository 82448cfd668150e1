"""Bytes of side-memory state per edit at a projection's shape, as a checkpoint stores it.

Builds the state ``wise edit``'s defaults leave after T edits (one memory per
``edits_per_memory``, ``keys_per_edit`` router keys per edit, the basis and the replay
factor) at the FFN output projection of a model it never loads, in the dtypes
``wise.safetensors`` stores (``stored.stored_state``): with masked shards (a 16-bit memory per ``edits_per_memory``), with
subspace shards (``shard_rank`` > 0: a 16-bit factor per shard, memories rebuilt from them), and
in format 3's (float32 memories and replay factor, float16 keys) beside them:

    python benchmarks/storage.py --shape llama-2-7b --T 1000 10000
    python benchmarks/storage.py --shape smollm2-135m --T 1000 --shard-rank 64

The tensors are random (their bytes do not depend on their values); ``wise info`` gives
the figure of a real checkpoint.
"""
from __future__ import annotations

import argparse
import json

import torch

from wisecli.methods.wise.config import WiseConfig

# The answer gate's keys per edit: the bare prompt's, and two chat turns' (editor._answer_keys).
ANSWER_KEYS_PER_EDIT = 3
# Other keys per edit and other relation (editor._other_keys, with a chat template): the
# reply's start to the completion and to the question.
OTHER_KEYS_PER_RELATION = 2
# FFN output projection (d_out, d_in) of each shape.
SHAPES = {"llama-2-7b": (4096, 11008), "llama-3-8b": (4096, 14336), "smollm2-135m": (576, 1536)}


def _sized(dtype: torch.dtype, *shape: int) -> torch.Tensor:
    """A tensor of this size and dtype that allocates one element (only sizes are read)."""
    return torch.zeros((1,) * len(shape), dtype=dtype).expand(*shape)


def old_format(form: str) -> bool:
    return form == "format_3"


def state(d_out: int, d_in: int, t: int, cfg: WiseConfig, form: str) -> dict[str, torch.Tensor]:
    """The layer's buffers after ``t`` edits in merge mode, as ``form`` stores them:
    "format_3" (float32 memories, float16 keys), "masked" or "subspace" (``cfg.shard_rank``)
    shards in the dtypes ``stored.stored_state`` writes (float16 memories, factors and replay
    factor; float8 keys with an int16 power of two each; the memories or the shards' factors,
    whichever is smaller, as ``tests/test_subspace.py`` checks)."""
    k = -(-t // cfg.edits_per_memory)
    m, a = t * cfg.keys_per_edit, t * ANSWER_KEYS_PER_EDIT
    o = t * OTHER_KEYS_PER_RELATION * cfg.other_relations if not old_format(form) else 0
    s = -(-t // cfg.edits_per_shard) if form == "subspace" else 0
    rank = min(cfg.shard_rank, d_in) if form == "subspace" else 0
    old = old_format(form)
    half, keys = (torch.float32, torch.float16) if old else (torch.float16, torch.float8_e4m3fn)
    tensors = {"thresholds": _sized(torch.float32, k), "min_edit_scores": _sized(torch.float32, k),
               "scale": torch.ones(()), "basis": _sized(torch.float32, d_in, cfg.null_space_rank),
               "edit_keys": _sized(keys, m, d_in), "key_edit": _sized(torch.long, m),
               "key_memory": _sized(torch.long, m), "answer_keys": _sized(keys, a, d_in),
               "answer_key_edit": _sized(torch.long, a), "other_keys": _sized(keys, o, d_in),
               "other_key_edit": _sized(torch.long, o),
               "replay_factor": _sized(half, d_in, min(cfg.replay_rank, d_in)), "replay_count": torch.ones(()),
               "shard_factors": _sized(torch.float16, s, d_out, rank), "shard_memory": _sized(torch.long, s),
               "shard_seeds": _sized(torch.long, s)}
    if not old:
        tensors |= {"key_exponents": _sized(torch.int16, m), "answer_key_exponents": _sized(torch.int16, a),
                    "other_key_exponents": _sized(torch.int16, o)}
    if form != "subspace" or s * rank >= k * d_in:  # stored_state keeps the smaller form
        tensors["memories"] = _sized(half, k, d_out, d_in)
        tensors |= {"shard_factors": _sized(torch.float16, 0, d_out, rank),
                    "shard_memory": _sized(torch.long, 0), "shard_seeds": _sized(torch.long, 0)}
    return tensors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-2-7b", choices=sorted(SHAPES))
    ap.add_argument("--T", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--shard-rank", type=int, default=None, help="subspace shards' rank (default: wise's)")
    args = ap.parse_args()
    cfg, (d_out, d_in) = WiseConfig(), SHAPES[args.shape]
    if args.shard_rank is not None:
        cfg = cfg.replace(shard_rank=args.shard_rank)
    for t in args.T:
        row = {"shape": args.shape, "T": t}
        for name in ("format_3", "masked", "subspace")[: 3 if cfg.shard_rank else 2]:
            tensors = state(d_out, d_in, t, cfg, name)
            parts = {n: v.numel() * v.element_size() for n, v in tensors.items()}
            size = sum(parts.values())  # what the file holds, less its header (a few KB)
            row[name] = {"bytes": size, "bytes_per_edit": size // t,
                         "largest": sorted(parts, key=parts.get, reverse=True)[:3]}
            del tensors
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
