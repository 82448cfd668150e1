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

from wisecli.batching import Batch
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
    """One forward pass that stops at the side-memory layer, keeping its inputs.

    ``known``: (K, T_k, d_in) activations of the batch's last K rows, already recorded
    (the irrelevant prompts are the same in every shard, and were most of this pass's
    cost), left-padded like the batch.  Only the other rows run; the result is the same.
    """
    n_rows, seq = batch.input_ids.shape
    n_known = 0 if known is None else known.shape[0]
    n_live = n_rows - n_known
    width = int(batch.attention_mask[:n_live].sum(-1).max()) if n_live else 0
    live = batch.rows(torch.arange(n_live, device=batch.input_ids.device)).last_cols(width)
    store: dict[str, Any] = {"block_out": None}

    def keep_block(_m: nn.Module, _inp: Any, output: Any) -> None:
        store["block_out"] = output

    def keep_acts(_m: nn.Module, args: tuple) -> None:
        store["acts"] = args[0].detach()
        raise StopForward

    if n_live:
        handles = [mem.register_forward_pre_hook(keep_acts)]
        if layer > 0:
            handles.append(blocks[layer - 1].register_forward_hook(keep_block))
        try:
            with torch.no_grad():
                model(**model_inputs(live))
        except StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
    if n_known == 0 and width == seq:
        return Recorded(store["block_out"], store["acts"], n_live, width)
    like = store["acts"] if n_live else known
    acts = like.new_zeros(n_rows, seq, like.shape[-1])
    if n_live:
        acts[:n_live, seq - width:] = store["acts"]
    if n_known:
        k_width = min(known.shape[1], seq)
        acts[n_live:, seq - k_width:] = known[:, -k_width:].to(acts.dtype)
    return Recorded(store["block_out"], acts, n_live, width)


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
