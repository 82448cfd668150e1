"""The plain reference: every step runs the whole model forward and backward.

That is what EasyEdit's WISE does (all layers, all positions' logits, every row
through the model); ``train_shard`` with this forward gives the same side memory
as the fast path, only slower.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from wisecli.batching import Batch
from wisecli.runtime.maths import target_accuracy, target_nll
from wisecli.runtime.memory import SideMemoryLayer
from wisecli.methods.wise.train import RowsForward


def reference_forward(model: nn.Module, mem: SideMemoryLayer, batch: Batch) -> RowsForward:
    def run(ce_idx: torch.Tensor, e_idx: torch.Tensor, i_idx: torch.Tensor, delta: torch.Tensor):
        both = torch.cat([ce_idx, e_idx, i_idx]).to(delta.device)
        sub = batch.rows(both)
        with mem.with_delta(delta, sub.query_mask):
            logits = model(input_ids=sub.input_ids, attention_mask=sub.attention_mask,
                           position_ids=sub.position_ids, use_cache=False).logits
        scores, tokens, weights = mem.train_scores.pooled, mem.train_scores.tokens, mem.train_scores.weights
        n, m = ce_idx.numel(), e_idx.numel()
        ce = None
        if n:
            labels = sub.labels[:n]
            ce = target_nll(logits[:n], labels), target_accuracy(logits[:n].detach(), labels)[1]
        return ce, scores[n:n + m], tokens[n + m:], weights[n + m:]
    return run
