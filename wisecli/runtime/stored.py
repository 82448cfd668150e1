"""The side-memory layer's state as a checkpoint stores it, and back.

A checkpoint holds exactly the layer's buffers, in fewer bytes where that loses nothing:
float16 memories, shard factors and replay factor (the layer holds them as float16 values),
float8 keys with a power of two each, and no memories where their subspace shards' factors
rebuild them exactly in fewer bytes.  ``stored_state`` and ``runtime_state`` are inverses; the
exported ``modeling_wise.py`` reads a checkpoint with the latter too.
"""
from __future__ import annotations

import torch

from .maths import fp8_keys, from_fp8_keys, subspace_memory

# Buffers every checkpoint holds, and their dtypes as the layer holds them (a checkpoint may
# store some in fewer bits: ``stored_state``).
STATE_DTYPES = {"memories": torch.float32, "thresholds": torch.float32, "min_edit_scores": torch.float32,
                "scale": torch.float32, "basis": torch.float32, "edit_keys": torch.float16,
                "key_edit": torch.long, "key_memory": torch.long, "answer_keys": torch.float16,
                "answer_key_edit": torch.long, "other_keys": torch.float16, "other_key_edit": torch.long,
                "replay_factor": torch.float32, "replay_count": torch.float32,
                "shard_factors": torch.float32, "shard_memory": torch.long, "shard_seeds": torch.long}
# Key buffers a checkpoint stores as float8 values, with a power of two per key in the second.
FP8_KEYS = {"edit_keys": "key_exponents", "answer_keys": "answer_key_exponents",
            "other_keys": "other_key_exponents"}
HALVES = ("memories", "replay_factor", "shard_factors")  # float32 buffers stored in float16


def memories_from_shards(state: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Every memory rebuilt from its subspace shards (``maths.subspace_memory``), or None when
    the state has no shards.  A memory without shards comes back as zeros."""
    factors = state.get("shard_factors")
    if factors is None or not factors.numel():
        return None
    basis, owner, seeds = state["basis"].float(), state["shard_memory"], state["shard_seeds"]
    out = torch.zeros(state["thresholds"].shape[0], factors.shape[1], basis.shape[0], device=factors.device)
    for k in owner.unique().tolist():
        sel = owner == k
        out[k] = subspace_memory(factors[sel], seeds[sel], basis)
    return out


def stored_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layer's buffers as a checkpoint stores them, losslessly: no memories where their
    subspace shards rebuild them exactly and in fewer bytes (``memories_from_shards``; a
    rank-256 factor per 10 edits is larger than a 576 × 1536 memory per 100, smaller than a
    4096 × 11008 one), memories, shard factors
    and the replay factor in float16, the keys in float8 with a power of two per key (``FP8_KEYS``),
    where those hold them exactly (``add_memory``, ``replace_memory``, ``set_replay`` and
    ``add_keys`` round them so; an older checkpoint's memories stay float32)."""
    out = dict(state)
    rebuilt = memories_from_shards(state)
    if rebuilt is not None and state["shard_factors"].numel() < state["memories"].numel() \
            and torch.equal(rebuilt, state["memories"].to(rebuilt.device)):
        del out["memories"]  # the factors make them again, exactly, in fewer bytes
    elif rebuilt is not None:  # the memories hold everything the factors would rebuild
        out |= {"shard_factors": state["shard_factors"][:0], "shard_memory": state["shard_memory"][:0],
                "shard_seeds": state["shard_seeds"][:0]}
    for name in HALVES:
        if name not in out:
            continue
        half = out[name].half()
        if torch.equal(half.float(), out[name]):
            out[name] = half
    for name, exp_name in FP8_KEYS.items():
        values, exponents = fp8_keys(state[name])
        if torch.equal(from_fp8_keys(values, exponents).to(state[name].dtype), state[name]):
            out[name], out[exp_name] = values, exponents
    return out


def runtime_state(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``stored_state``'s inverse: those buffers in the layer's dtypes."""
    state = dict(stored)
    if "memories" not in state and "shard_factors" in state:
        factors = state["shard_factors"].float()
        state["memories"] = memories_from_shards({**state, "shard_factors": factors})
    for name, exp_name in FP8_KEYS.items():
        exponents = state.pop(exp_name, None)
        if exponents is not None:
            state[name] = from_fp8_keys(state[name], exponents).to(STATE_DTYPES[name])
    for name in HALVES:
        if name in state:
            state[name] = state[name].to(STATE_DTYPES[name])
    return state
