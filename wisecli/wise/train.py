"""One shard of edits, trained together into a masked side-memory delta.

Speed comes from where the side memory sits: nothing below layer L depends on
it, so the blocks below L run once per shard (their output is recorded and
replayed) and each optimisation step runs only blocks L..N and the LM head on
the answer positions.  The result equals a full forward/backward per step
(``tests/test_train.py`` checks it against that reference).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from ..batching import Batch
from ..config import WiseConfig
from .maths import margin_loss, target_accuracy, target_nll
from .memory import SideMemoryLayer


@dataclass
class ShardResult:
    delta: torch.Tensor     # (d_out, d_in) masked update τ ⊙ M, float32
    steps: int
    loss: float
    learned: int            # edits whose every row is predicted right
    n_edits: int
    seconds: float


IRRELEVANT = -1   # row_edit of generic irrelevant rows (a sample of them in each step)
NEAR_MISS = -2    # row_edit of near-miss rows (all of them in every step)


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the recorded block has run."""


def _map_rows(obj: Any, idx: torch.Tensor, n_rows: int) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj[idx] if obj.dim() > 0 and obj.shape[0] == n_rows else obj
    if isinstance(obj, tuple):
        return tuple(_map_rows(o, idx, n_rows) for o in obj)
    return obj


class _Replay(nn.Module):
    """Stands in for a block below L: returns block L-1's recorded output."""

    def __init__(self, holder: dict) -> None:
        super().__init__()
        self.holder = holder

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.holder["output"]


def _model_inputs(batch: Batch) -> dict[str, Any]:
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
            "position_ids": batch.position_ids, "use_cache": False}


def forward_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Logits of the answer positions only (all positions if the model can't trim)."""
    try:
        out = model(**_model_inputs(batch), logits_to_keep=batch.logits_to_keep)
        logits = out.logits
    except TypeError:  # architectures without logits_to_keep
        logits = model(**_model_inputs(batch)).logits
    return logits[:, -batch.logits_to_keep:]


def record_block_output(model: nn.Module, blocks: nn.ModuleList, layer: int, batch: Batch) -> Any:
    """Run the model up to block ``layer - 1`` and return that block's output."""
    store: dict[str, Any] = {}

    def hook(_m: nn.Module, _inp: Any, output: Any) -> None:
        store["output"] = output
        raise _Stop

    handle = blocks[layer - 1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(**_model_inputs(batch), logits_to_keep=1)
    except _Stop:
        pass
    finally:
        handle.remove()
    return store["output"]


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


def train_shard(model: nn.Module, mem: SideMemoryLayer, blocks: nn.ModuleList, layer: int,
                batch: Batch, row_edit: torch.Tensor, base_delta: torch.Tensor,
                mask: torch.Tensor, cfg: WiseConfig, *, fast: bool = True,
                progress: Callable[[int, float, int], None] | None = None) -> ShardResult:
    """Optimise τ so that ``base_delta + τ ⊙ mask`` learns the shard's edits.

    batch: every training row (edit rows with prefixes, then irrelevant rows);
    row_edit: (R,) the edit index of each row, -1 for irrelevant rows.  Leaves the
    model as it found it (``mem.train_delta`` cleared, blocks restored).
    """
    t0 = time.perf_counter()
    dev = base_delta.device
    batch, row_edit, mask = batch.to(dev), row_edit.to(dev), mask.to(dev)
    n_rows = batch.input_ids.shape[0]
    n_edits = int(row_edit.max().item()) + 1
    # Edit rows come first, edit by edit, each edit with the same number of variants.
    edit_rows = (row_edit >= 0).nonzero().squeeze(-1).view(n_edits, -1)  # (E, V)
    irr_rows = (row_edit == IRRELEVANT).nonzero().squeeze(-1)
    near_rows = (row_edit == NEAR_MISS).nonzero().squeeze(-1)
    tau = torch.zeros_like(base_delta, requires_grad=True)
    opt = torch.optim.Adam([tau], lr=cfg.learning_rate)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    holder: dict[str, Any] = {}
    recorded = record_block_output(model, blocks, layer, batch) if fast and layer > 0 else None
    active = torch.ones(n_edits, dtype=torch.bool, device=dev)
    step, loss_val = 0, float("nan")
    for step in range(1, cfg.max_steps + 1):
        n_var = edit_rows.shape[1]
        cols = torch.cat([torch.zeros(1, dtype=torch.long),
                          1 + torch.randperm(n_var - 1, generator=gen)[: cfg.variants_per_step - 1]])
        n_irr = min(cfg.negatives_per_step, irr_rows.numel())
        pick = irr_rows[torch.randperm(irr_rows.numel(), generator=gen)[:n_irr].to(dev)]
        idx = torch.cat([edit_rows[:, cols.to(dev)].reshape(-1), near_rows, pick])
        sub, sub_edit = batch.rows(idx), row_edit[idx]
        mem.train_delta = base_delta + tau * mask
        mem.token_mask, mem._explicit_mask = sub.query_mask, True
        try:
            if recorded is not None:
                holder["output"] = _map_rows(recorded, idx, n_rows)
                with replay_lower_blocks(blocks, layer, holder):
                    logits = forward_logits(model, sub)
            else:
                logits = forward_logits(model, sub)
            scores = mem.last_scores
        finally:
            mem.train_delta, mem.token_mask, mem._explicit_mask = None, None, False
        labels = sub.kept_labels()
        is_edit = sub_edit >= 0
        nll = target_nll(logits, labels)
        _, row_ok = target_accuracy(logits.detach(), labels)
        # An edit stops contributing once every one of its rows is right; it comes back if it slips.
        wrong = torch.zeros(n_edits, device=dev).index_add_(
            0, sub_edit[is_edit], (~row_ok[is_edit]).float())
        active = wrong > 0
        weight = active[sub_edit.clamp_min(0)] & is_edit
        ce = (nll * weight).sum() / weight.sum().clamp_min(1)
        m_loss = margin_loss(scores[is_edit], scores[~is_edit], cfg.margin_irrelevant,
                             cfg.margin_edit, cfg.margin_gap)
        loss = ce + cfg.margin_weight * m_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cfg.weight_decay:
            with torch.no_grad():
                tau.mul_(1 - cfg.learning_rate * cfg.weight_decay)  # τ is zero off the mask
        if step % cfg.check_every == 0 or step == cfg.max_steps:
            # The only host syncs of the loop, once every check_every steps.
            loss_val = float(loss.detach())
            n_active = int(active.sum())
            separated = bool(scores[~is_edit].max() < cfg.act_ratio * scores[is_edit].min()) \
                if (~is_edit).any() else True
            if progress is not None:
                progress(step, loss_val, n_active)
            if step >= cfg.min_steps and n_active == 0 and separated:
                break
    delta = (tau.detach() * mask).float()
    return ShardResult(delta=delta, steps=step, loss=loss_val, learned=n_edits - int(active.sum()),
                       n_edits=n_edits, seconds=time.perf_counter() - t0)
