"""What does not change while a shard trains: recorded once, replayed at every step.

Nothing below the side memory's layer L depends on it, so one forward pass per shard
records what block L-1 hands on and what the memory's projection reads; each step then
stands the lower blocks in with the recording instead of running them (``train.py``).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn

from wisecli.batching import Batch, length_groups
from wisecli.runtime.memory import SideMemoryLayer


class StopForward(Exception):
    """Raised from a hook to end a forward pass once the recorded block has run."""


def map_rows(obj: Any, idx: torch.Tensor, n_rows: int, seq: int, width: int) -> Any:
    """Select rows (and the last ``width`` of ``seq`` positions) of a recorded output."""
    if isinstance(obj, torch.Tensor):
        if obj.dim() == 0 or obj.shape[0] != n_rows:
            return obj
        out = obj[idx]
        return out[:, -width:] if out.dim() > 1 and out.shape[1] == seq else out
    if isinstance(obj, tuple):
        return tuple(map_rows(o, idx, n_rows, seq, width) for o in obj)
    return obj


class _Replay(nn.Module):
    """Stands in for a block below L: returns block L-1's recorded output."""

    def __init__(self, holder: dict) -> None:
        super().__init__()
        self.holder = holder

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.holder["output"]


def model_inputs(batch: Batch) -> dict[str, Any]:
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
            "position_ids": batch.position_ids, "use_cache": False}

@dataclass
class Recorded:
    """What does not change while τ trains: recorded once per shard."""

    block_out: Any          # output of block L-1 for the first ``n_live`` rows (None when L == 0)
    acts: torch.Tensor      # (R, T, d_in) input of the projection at layer L, every row
    n_live: int = 0         # rows run through the model (the rest came from ``known``)
    live_width: int = 0     # positions kept for those rows (the rest is padding in all of them)


def record_inputs(model: nn.Module, blocks: nn.ModuleList, mem: SideMemoryLayer, layer: int,
                  batch: Batch, known: torch.Tensor | None = None) -> Recorded:
    """Forward passes that stop at the side-memory layer, keeping its inputs.

    ``known``: (K, T_k, d_in) activations of the batch's last K rows, already recorded
    (the irrelevant prompts are the same in every shard, and were most of this pass's
    cost), left-padded like the batch.  Only the other rows run, in groups of like length
    (``length_groups``): with left padding and explicit positions a row's real positions
    come out the same whatever shares its batch, and padding is most of one batch's work.
    """
    n_rows, seq = batch.input_ids.shape
    n_known = 0 if known is None else known.shape[0]
    n_live = n_rows - n_known
    lengths = batch.attention_mask[:n_live].sum(-1).cpu()
    width = int(lengths.max()) if n_live else 0
    block_out, acts = None, None
    for group in length_groups(lengths):
        g_width = int(lengths[group].max())
        idx = group.to(batch.input_ids.device)
        g_block, g_acts = _run_to_memory(model, blocks, mem, layer, batch.rows(idx).last_cols(g_width))
        if acts is None:
            acts = g_acts.new_zeros(n_rows, seq, g_acts.shape[-1])
            block_out = _like(g_block, n_live, width)
        acts[idx, seq - g_width:] = g_acts
        _place(block_out, g_block, idx, g_width)
    if acts is None:
        acts = known.new_zeros(n_rows, seq, known.shape[-1])
    if n_known:
        k_width = min(known.shape[1], seq)
        acts[n_live:, seq - k_width:] = known[:, -k_width:].to(acts.dtype)
    return Recorded(block_out, acts, n_live, width)


def _run_to_memory(model: nn.Module, blocks: nn.ModuleList, mem: SideMemoryLayer, layer: int,
                   rows: Batch) -> tuple[Any, torch.Tensor]:
    """Block L-1's output (None when L == 0) and the memory projection's input for ``rows``."""
    store: dict[str, Any] = {"block_out": None}

    def keep_block(_m: nn.Module, _inp: Any, output: Any) -> None:
        store["block_out"] = output

    def keep_acts(_m: nn.Module, args: tuple) -> None:
        store["acts"] = args[0].detach()
        raise StopForward

    handles = [mem.register_forward_pre_hook(keep_acts)]
    if layer > 0:
        handles.append(blocks[layer - 1].register_forward_hook(keep_block))
    try:
        with torch.no_grad():
            model(**model_inputs(rows))
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return store["block_out"], store["acts"]


def _like(obj: Any, n_rows: int, width: int) -> Any:
    """Zeros shaped like a recorded block output, for ``n_rows`` rows of ``width`` positions
    (tensors without a row and a position axis are kept as they are)."""
    if isinstance(obj, torch.Tensor):
        return obj.new_zeros(n_rows, width, *obj.shape[2:]) if obj.dim() > 1 else obj
    if isinstance(obj, tuple):
        return tuple(_like(o, n_rows, width) for o in obj)
    return obj


def _place(out: Any, part: Any, idx: torch.Tensor, width: int) -> None:
    """Write one group's block output into rows ``idx``, right-aligned (left padding)."""
    if isinstance(out, torch.Tensor) and out.dim() > 1:
        out[idx, out.shape[1] - width:] = part
    elif isinstance(out, tuple):
        for o, p in zip(out, part):
            _place(o, p, idx, width)


@contextmanager
def replay_lower_blocks(blocks: nn.ModuleList, layer: int, holder: dict) -> Iterator[None]:
    """Swap blocks 0..L-1 for replays of the recorded output; restore them after."""
    saved = [blocks[i] for i in range(layer)]
    for i in range(layer):
        blocks[i] = _Replay(holder)
    try:
        yield
    finally:
        for i, blk in enumerate(saved):
            blocks[i] = blk
