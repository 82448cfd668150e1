"""A WISE checkpoint's saved state, checked before the side-memory layer takes it.

Every tensor the layer holds, in its dtype, shaped for the edited module, finite, with every
index in range and in step with the manifest: a state that cannot route is an error when
the checkpoint is read, never the unedited model later.
"""
from __future__ import annotations

from typing import Any

import torch

from wisecli.errors import CheckpointError
from wisecli.runtime.stored import FP8_KEYS, HALVES, STATE_DTYPES, runtime_state

# What a checkpoint may store instead of the layer's dtype (``stored.stored_state``).
STORED_DTYPES = {**{name: (torch.float32, torch.float16) for name in HALVES},
                 **{name: (torch.float16, torch.float8_e4m3fn) for name in FP8_KEYS}}


def check_state(manifest: dict, tensors: dict[str, torch.Tensor], where: str) -> None:
    """The tensors as the side-memory layer will hold them: exactly its buffers, in their dtypes,
    shaped for the target, finite, with every index in range, and in step with the manifest.
    A state that cannot route is an error here, never the unedited model later."""
    def bad(message: str) -> CheckpointError:
        return CheckpointError(f"{where}: {message}", hint="the checkpoint is damaged; re-create it with wise edit")
    _check_stored(tensors, bad)
    try:  # memories stored as their shards' factors are rebuilt here
        tensors = runtime_state(tensors)
    except (RuntimeError, IndexError, KeyError, ValueError) as exc:
        raise bad(f"tensors 'shard_*' do not rebuild the side memories ({str(exc).splitlines()[0][:120]})") from None
    missing, extra = sorted(set(STATE_DTYPES) - set(tensors)), sorted(set(tensors) - set(STATE_DTYPES))
    if missing or extra:
        raise bad(f"tensor '{(missing or extra)[0]}' is {'missing' if missing else 'not one wise writes'}")
    for name, dtype in STATE_DTYPES.items():
        if tensors[name].dtype != dtype:
            raise bad(f"tensor '{name}' is {tensors[name].dtype}, expected {dtype}")
        if tensors[name].is_floating_point() and not bool(torch.isfinite(tensors[name]).all()):
            raise bad(f"tensor '{name}' holds NaN or Inf")
    for name, shape in _expected_shapes(manifest["target"], tensors).items():
        if tuple(tensors[name].shape) != shape:
            raise bad(f"tensor '{name}' has shape {list(tensors[name].shape)}, expected {list(shape)}")
    _check_indices(manifest, tensors, bad)


def _check_stored(tensors: dict[str, torch.Tensor], bad: Any) -> None:
    """The storage forms ``runtime_state`` reads: 16-bit memories and replay factor, float8
    keys with their powers of two."""
    for name, stored in STORED_DTYPES.items():
        if name in tensors and tensors[name].dtype not in stored:
            raise bad(f"tensor '{name}' is {tensors[name].dtype}, expected one of "
                      f"{', '.join(str(d) for d in stored)}")
    for name, exp_name in FP8_KEYS.items():
        fp8, exponents = tensors.get(name), tensors.get(exp_name)
        if (fp8 is not None and fp8.dtype == torch.float8_e4m3fn) != (exponents is not None):
            raise bad(f"tensors '{name}' and '{exp_name}': float8 keys need their exponents, and only they")
        if exponents is not None and (exponents.dtype != torch.int16 or tuple(exponents.shape) != (fp8.shape[0],)):
            raise bad(f"tensor '{exp_name}' must be int16 of shape [{fp8.shape[0]}]")


def _expected_shapes(target: dict, t: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    d_in, d_out = target["in_features"], target["out_features"]
    k, m = int(t["memories"].shape[0]) if t["memories"].dim() else -1, int(t["edit_keys"].shape[0])
    rank = int(t["basis"].shape[1]) if t["basis"].dim() == 2 else -1
    replay = int(t["replay_factor"].shape[1]) if t["replay_factor"].dim() == 2 else -1
    a, o = int(t["answer_keys"].shape[0]), int(t["other_keys"].shape[0])
    n_shards = int(t["shard_factors"].shape[0]) if t["shard_factors"].dim() == 3 else -1
    shard_rank = int(t["shard_factors"].shape[2]) if t["shard_factors"].dim() == 3 else -1
    return {"memories": (k, d_out, d_in), "thresholds": (k,), "min_edit_scores": (k,), "scale": (),
            "basis": (d_in, max(rank, 0)) if rank <= d_in else (d_in, d_in), "edit_keys": (m, d_in),
            "key_edit": (m,), "key_memory": (m,), "answer_keys": (a, d_in), "answer_key_edit": (a,),
            "other_keys": (o, d_in), "other_key_edit": (o,),
            "replay_count": (), "shard_factors": (n_shards, d_out, shard_rank),
            "shard_memory": (n_shards,), "shard_seeds": (n_shards,),
            "replay_factor": (0, 0) if replay <= 0 and t["replay_factor"].numel() == 0 else (d_in, max(replay, 0))}


def _check_indices(manifest: dict, t: dict[str, torch.Tensor], bad: Any) -> None:
    k = int(t["memories"].shape[0])
    if float(t["scale"]) <= 0:
        raise bad("tensor 'scale' must be > 0")
    if t["key_memory"].numel() and not (0 <= int(t["key_memory"].min()) and int(t["key_memory"].max()) < k):
        raise bad(f"tensor 'key_memory' points outside the {k} side memories")
    if t["key_edit"].numel() and int(t["key_edit"].min()) < 0:
        raise bad("tensor 'key_edit' holds a negative edit number")
    if t["shard_memory"].numel() and not (0 <= int(t["shard_memory"].min()) and int(t["shard_memory"].max()) < k):
        raise bad(f"tensor 'shard_memory' points outside the {k} side memories")
    n_edits = len(manifest["edits"])
    for name in ("answer_key_edit", "other_key_edit"):
        if t[name].numel() and not (0 <= int(t[name].min()) and int(t[name].max()) < n_edits):
            raise bad(f"tensor '{name}' points outside the {n_edits} edits")
    if manifest["router"]["n_memories"] != k:
        raise bad(f"field 'router.n_memories' is {manifest['router']['n_memories']}, the tensors hold {k}")
    placed = [e.get("memory") for e in manifest["edits"]]
    if placed and k == 0:
        raise bad(f"{len(placed)} edits and no side memory: nothing could route to them")
    stray = next((i for i, m in enumerate(placed) if m is not None and not 0 <= m < k), None)
    if stray is not None:
        raise bad(f"field 'edits[{stray}].memory' is {placed[stray]}, the tensors hold memories 0..{k - 1}")
