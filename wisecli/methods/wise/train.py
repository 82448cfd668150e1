"""One shard of edits, trained together into a masked side-memory delta.

Speed comes from where the side memory sits: nothing below layer L depends on
it, so the blocks below L run once per shard (their output is recorded and
replayed) and each optimisation step runs only blocks L..N and the LM head on
the answer positions.  The result equals a full forward/backward per step
(``tests/test_wise.py`` checks it against that reference).
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from wisecli.batching import Batch
from wisecli.methods.wise.config import WiseConfig
from wisecli.runtime.maths import margin_loss, pool_scores, project_out, replay_penalty, token_scores
from wisecli.runtime.memory import SideMemoryLayer
from wisecli.methods.wise.recorded import Recorded, map_rows, model_inputs, record_inputs, replay_lower_blocks


@dataclass
class ShardResult:
    delta: torch.Tensor     # (d_out, d_in) the shard's update, τ ⊙ M or τ·A, float32
    steps: int
    loss: float
    learned: int            # edits whose every row is predicted right
    n_edits: int
    seconds: float
    # The edit rows' recorded activations and real tokens (answers too; fast path only),
    # folded into the replay factor after the merge without a new forward pass.
    edit_acts: torch.Tensor | None = None
    edit_attn: torch.Tensor | None = None
    edit_query: torch.Tensor | None = None  # the edit rows' query tokens (their keys are read there)
    factor: torch.Tensor | None = None  # (d_out, r) τ of a subspace shard: delta = τ·A


IRRELEVANT = -1   # row_edit of generic irrelevant rows (a sample of them in each step)
NEAR_MISS = -2    # row_edit of near-miss rows (all of them in every step)



def _trimmed_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's logits, asking it to compute only the last logits_to_keep positions."""
    try:
        return model(**model_inputs(batch), logits_to_keep=batch.logits_to_keep).logits
    except TypeError:  # architectures without logits_to_keep
        return model(**model_inputs(batch)).logits


def forward_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Logits of the answer positions only (all positions if the model can't trim)."""
    return _trimmed_logits(model, batch)[:, -batch.logits_to_keep:]


def answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the logits that score an answer token are: (row, column) of each position
    predicting a labelled token, and that token.  labels: (R, K) host tensor."""
    rows, cols = (labels[:, 1:] != -100).nonzero(as_tuple=True)
    return rows, cols, labels[:, 1:][rows, cols]


@contextmanager
def head_on_positions(model: nn.Module, rows: torch.Tensor, from_end: torch.Tensor) -> Iterator[None]:
    """Run the LM head only on the given positions of its input (counted from the end,
    -1 the last, so it holds whether the model trimmed to logits_to_keep or not).

    The head's matmul over a large vocabulary costs as much as several blocks, and
    most of the positions it would score are not answer tokens (answers differ in
    length; every row is scored over the longest).  Anything the model does to the
    logits afterwards (soft-capping) is element-wise, so it still applies.
    """
    head = model.get_output_embeddings()

    def gather(_m: nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        return (hidden[rows, from_end + hidden.shape[1]][None],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def row_losses(logits: torch.Tensor, gold: torch.Tensor, row: torch.Tensor,
               n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean cross-entropy and all-correct, from the (N, V) logits of the answer
    tokens ``gold`` (N,) of rows ``row`` (N,): ``maths.target_nll`` / ``target_accuracy``
    on the scored positions only."""
    nll = F.cross_entropy(logits.float(), gold, reduction="none")
    wrong = (logits.detach().argmax(-1) != gold).float()
    ones = torch.ones_like(nll)
    count = torch.zeros(n_rows, device=nll.device).index_add_(0, row, ones)
    row_nll = torch.zeros(n_rows, device=nll.device).index_add_(0, row, nll) / count.clamp_min(1)
    row_wrong = torch.zeros(n_rows, device=nll.device).index_add_(0, row, wrong)
    return row_nll, (row_wrong == 0) & (count > 0)



RowsForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                       tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor, torch.Tensor,
                             torch.Tensor]]
"""(CE rows, scored edit rows, irrelevant rows, delta) -> ((per-row answer NLL, per-row
all-correct) of the CE rows or None when there are none, edit scores, irrelevant per-token
scores and weights, see ``maths.token_scores``).  Row indices are host tensors, so a
forward can plan on them without waiting on the device."""


def _edit_forward(model: nn.Module, mem: SideMemoryLayer, blocks: nn.ModuleList, layer: int,
                  sub: Batch, delta: torch.Tensor, block_out: Any,
                  positions: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(N, V) logits of the answer tokens at ``positions`` of edit rows, only blocks L..N
    running and the head only where an answer token is scored."""
    replay = replay_lower_blocks(blocks, layer, {"output": block_out}) if block_out is not None \
        else nullcontext()
    with mem.with_delta(delta, sub.query_mask), head_on_positions(model, *positions), replay:
        logits = _trimmed_logits(model, sub)
    return logits.reshape(-1, logits.shape[-1])


def fast_forward(model: nn.Module, mem: SideMemoryLayer, blocks: nn.ModuleList, layer: int,
                 batch: Batch, rec: Recorded, pooling: str) -> RowsForward:
    """The product path: lower blocks replayed for the CE rows; scores from recorded a_t.

    A router score needs only ‖D a_t‖ at layer L, and a_t does not depend on D: it
    is recorded once and every row is scored with one matmul per step.  Only rows
    whose answers are still being learned run the blocks above L.
    """
    lengths = batch.attention_mask.sum(-1).cpu()  # host copies, so planning never syncs
    labels = batch.labels[:, -batch.logits_to_keep:].cpu()

    projected = project_out(rec.acts, mem.basis)  # once per shard, not once per step

    def scores(idx: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Only these rows' own width: the irrelevant prompts are a few tokens each, and the
        # batch is as wide as its longest chat turn.
        w = int(lengths[idx].max()) if idx.numel() else 1
        dev_idx = idx.to(delta.device)
        norms, m = token_scores(F.linear(projected[:, -w:][dev_idx], delta), batch.query_mask[:, -w:][dev_idx])
        return norms / mem.scale, m

    def run(ce_idx: torch.Tensor, e_idx: torch.Tensor, i_idx: torch.Tensor, delta: torch.Tensor):
        ce, dev = None, delta.device
        if ce_idx.numel():
            width = int(lengths[ce_idx].max())  # these rows' longest: the rest is padding
            idx = ce_idx.to(dev)
            block_out = map_rows(rec.block_out, idx, rec.n_live, rec.live_width, width) \
                if layer > 0 else None
            sub = batch.rows(idx).last_cols(width)
            row, col, gold = answer_positions(labels[ce_idx])
            col = col - (labels.shape[1] - 1) - 1  # counted from the end: the last column is -1
            logits = _edit_forward(model, mem, blocks, layer, sub, delta, block_out,
                                   (row.to(dev), col.to(dev)))
            ce = row_losses(logits, gold.to(dev), row.to(dev), ce_idx.numel())
        e_tok, e_m = scores(e_idx, delta)
        return ce, pool_scores(e_tok, e_m, pooling), *scores(i_idx, delta)
    return run


def variants_per_step(cfg: WiseConfig, longest_row: int) -> int:
    """Rows per edit in one step: ``variants_per_step``, fewer when the shard's longest
    edit row would take an edit past ``tokens_per_edit`` (never fewer than the bare prompt).

    Step cost grows with rows × width; prefixed copies are there so an edit holds in other
    contexts, which a 100-token prompt already provides, so long prompts drop them first.
    """
    return max(1, min(cfg.variants_per_step, cfg.tokens_per_edit // max(longest_row, 1)))


def _step_rows(edit_rows: torch.Tensor, near_rows: torch.Tensor, irr_rows: torch.Tensor,
               cfg: WiseConfig, gen: torch.Generator, n_variants: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This step's rows: each edit's bare prompt plus random prefixed copies, as an
    (E, v) host tensor; every near miss and a random sample of the generic prompts."""
    n_var = edit_rows.shape[1]
    cols = torch.cat([torch.zeros(1, dtype=torch.long),
                      1 + torch.randperm(n_var - 1, generator=gen)[: n_variants - 1]])
    pick = torch.randperm(irr_rows.numel(), generator=gen)[: cfg.negatives_per_step]
    return edit_rows[:, cols], torch.cat([near_rows, irr_rows[pick]])


def _separated(i_tokens: torch.Tensor, e_scores: torch.Tensor, act_ratio: float) -> bool:
    """Every irrelevant token scores below the router threshold the edits set."""
    return i_tokens.numel() == 0 or bool(i_tokens.max() < act_ratio * e_scores.min())


@dataclass(frozen=True)
class ShardRows:
    """Where a shard's rows are, as host tensors (so choosing a step's rows never syncs)."""

    edit: torch.Tensor        # (E, V): each edit's rows, the bare prompt first
    irrelevant: torch.Tensor  # generic irrelevant rows (a sample of them in each step)
    near: torch.Tensor        # near-miss rows (all of them in every step)
    n_variants: int           # rows per edit in one step

    @property
    def n_edits(self) -> int:
        return int(self.edit.shape[0])


def shard_rows(batch: Batch, row_edit: torch.Tensor, cfg: WiseConfig) -> ShardRows:
    """Edit rows come first, edit by edit, each edit with the same number of variants."""
    row_edit = row_edit.cpu()
    n_edits = int(row_edit.max()) + 1
    edit = (row_edit >= 0).nonzero().squeeze(-1).view(n_edits, -1)
    longest = int(batch.attention_mask[edit.reshape(-1).to(batch.attention_mask.device)].sum(-1).max())
    return ShardRows(edit, (row_edit == IRRELEVANT).nonzero().squeeze(-1),
                     (row_edit == NEAR_MISS).nonzero().squeeze(-1), variants_per_step(cfg, longest))


def answer_loss(ce: tuple[torch.Tensor, torch.Tensor], ce_edits: torch.Tensor, per_edit_rows: int,
                n_edits: int, learned_nll: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cross-entropy of the edits still being pushed, and per edit: wrong, pushing.

    An edit stops contributing once every row is right with some confidence to spare (mean
    answer NLL below ``learned_nll``): one stopped right at the boundary slips back at the
    next step of its neighbours.  It comes back if it slips.
    """
    nll, row_ok = ce
    row_ce_edit = ce_edits.repeat_interleave(per_edit_rows).to(nll.device)
    per_edit = torch.zeros(n_edits, device=nll.device)
    wrong = per_edit.index_add(0, row_ce_edit, (~row_ok).float()) > 0
    unsure = ~row_ok | (nll.detach() > learned_nll)
    pushing = per_edit.index_add(0, row_ce_edit, unsure.float()) > 0
    weight = pushing[row_ce_edit].float()
    return (nll * weight).sum() / weight.sum().clamp_min(1), wrong, pushing


class _Progress:
    """Per-edit early stopping, read from the device once every ``check_every`` steps.

    In between, only the edits still wrong at the last check get the cross-entropy (and a
    forward pass), so a shard gets cheaper as its edits are learned; an edit leaves only
    once it was right at two checks in a row, so one that just got there is not left to slip.
    """

    def __init__(self, n_edits: int) -> None:
        self.training = torch.ones(n_edits, dtype=torch.bool)
        self.was_wrong = self.training.clone()
        self.last_right: torch.Tensor | None = None  # τ at the latest check with every edit right

    def ce_edits(self, check: bool) -> torch.Tensor:
        return torch.arange(self.training.numel()) if check else self.training.nonzero().squeeze(-1)

    def update(self, wrong: torch.Tensor, pushing: torch.Tensor, tau: torch.Tensor) -> int:
        now_wrong, now_pushing = wrong.cpu(), pushing.cpu()
        self.training, self.was_wrong = now_pushing | self.was_wrong, now_wrong
        n_wrong = int(now_wrong.sum())
        if n_wrong == 0:
            self.last_right = tau.detach().clone()
        return n_wrong

    def settled(self, tau: torch.Tensor) -> torch.Tensor:
        """The τ to keep once the steps are spent.  When the router never separates (the
        user's negatives share the edits' templates) a shard runs to its limit, and an edit
        resting from the cross-entropy can drift wrong under the margin loss alone just as
        the steps run out: the last τ that had every edit right is kept instead."""
        if bool(self.was_wrong.any()) and self.last_right is not None:
            self.was_wrong = torch.zeros_like(self.was_wrong)
            return self.last_right
        return tau


def shard_parameter(base_delta: torch.Tensor, mask: torch.Tensor
                    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """The trained τ, and how it writes into the memory: τ ⊙ M under a boolean mask (τ as
    large as the memory), τ·A through a float (r, d_in) subspace (τ is d_out × r)."""
    if mask.dtype == torch.bool:
        return torch.zeros_like(base_delta, requires_grad=True), lambda t: t * mask
    tau = torch.zeros(base_delta.shape[0], mask.shape[0], device=base_delta.device, requires_grad=True)
    return tau, lambda t: t @ mask


def train_shard(model: nn.Module, mem: SideMemoryLayer, blocks: nn.ModuleList, layer: int,
                batch: Batch, row_edit: torch.Tensor, base_delta: torch.Tensor,
                mask: torch.Tensor, cfg: WiseConfig, *, forward: RowsForward | None = None,
                progress: Callable[[int, float, int], None] | None = None,
                replay: torch.Tensor | None = None, known: torch.Tensor | None = None) -> ShardResult:
    """Optimise τ so that ``base_delta + τ ⊙ mask`` learns the shard's edits, or, when
    ``mask`` is a float (r, d_in) subspace (``maths.shard_subspace``), ``base_delta + τ·mask``.

    batch: every training row (edit rows, prefixed copies, then irrelevant rows);
    row_edit: (R,) the edit index of each row, IRRELEVANT / NEAR_MISS otherwise.
    ``replay``: earlier edits' replay factor (merge mode), whose outputs τ must leave alone.
    ``known``: the irrelevant rows' recorded activations (see ``record_inputs``).  ``forward``
    computes a step (default: ``fast_forward``; the benchmark passes its reference).  Stops
    once every edit is right and every generic irrelevant prompt is below the threshold.
    Leaves the model as it found it.
    """
    t0 = time.perf_counter()
    dev = base_delta.device
    batch, mask = batch.to(dev), mask.to(dev)
    rows = shard_rows(batch, row_edit, cfg)
    tau, write = shard_parameter(base_delta, mask)
    opt = torch.optim.SGD([tau], lr=cfg.learning_rate, momentum=cfg.momentum)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    rec = record_inputs(model, blocks, mem, layer, batch, known) if forward is None else None
    run = forward or fast_forward(model, mem, blocks, layer, batch, rec, cfg.score_pooling)
    # Near misses share the edit's template, so their max-pooled scores can stay above the
    # threshold however long τ trains; the key gate rejects them, so only the generic
    # prompts must be separated to stop.
    n_gate_exempt = rows.near.numel() if cfg.key_gate > 0 else 0
    state = _Progress(rows.n_edits)
    step, loss_val = 0, float("nan")
    for step in range(1, cfg.max_steps + 1):
        check = step % cfg.check_every == 0 or step == cfg.max_steps
        step_edits, i_idx = _step_rows(rows.edit, rows.near, rows.irrelevant, cfg, gen, rows.n_variants)
        ce_edits = state.ce_edits(check)
        ce, e_scores, i_tokens, i_mask = run(step_edits[ce_edits].reshape(-1), step_edits.reshape(-1),
                                             i_idx, base_delta + write(tau))
        loss = margin_loss(e_scores, i_tokens, i_mask, cfg.margin_irrelevant, cfg.margin_edit,
                           cfg.margin_gap, cfg.score_pooling)
        if ce is not None:
            ce_loss, wrong, pushing = answer_loss(ce, ce_edits, step_edits.shape[1], rows.n_edits,
                                                  cfg.learned_nll)
            loss = loss + ce_loss
        if replay is not None and cfg.replay_weight:
            loss = loss + cfg.replay_weight * replay_penalty(write(tau), replay) / mem.scale ** 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if check:  # the only host syncs of the loop
            n_active, loss_val = state.update(wrong, pushing, tau), float(loss.detach())
            if progress is not None:
                progress(step, loss_val, n_active)
            if step >= cfg.min_steps and n_active == 0 and \
                    _separated(i_tokens[n_gate_exempt:], e_scores, cfg.act_ratio):
                break
    return _result(state.settled(tau), write, mask.dtype != torch.bool, step, loss_val, state, rows, rec, batch, time.perf_counter() - t0)


def _result(tau: torch.Tensor, write: Callable[[torch.Tensor], torch.Tensor], subspace: bool, steps: int, loss: float, state: _Progress,
            rows: ShardRows, rec: Recorded | None, batch: Batch, seconds: float) -> ShardResult:
    edit_rows = rows.edit.reshape(-1).to(tau.device)
    return ShardResult(delta=write(tau.detach()).float(), steps=steps, loss=loss,
                       learned=rows.n_edits - int(state.was_wrong.sum()), n_edits=rows.n_edits,
                       seconds=seconds, edit_acts=rec.acts[edit_rows] if rec else None,
                       edit_attn=batch.attention_mask[edit_rows] if rec else None,
                       edit_query=batch.query_mask[edit_rows] if rec else None,
                       factor=tau.detach().float() if subspace else None)
