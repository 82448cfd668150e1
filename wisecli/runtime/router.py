"""The router: which side memory, if any, answers each prompt of a batch.

WISE's router (paper, Sec. 3.2) sends a prompt through side memory k when its activation
score ``‖D_k a‖`` clears the threshold learned at edit time, else through the main memory.
In front of that score we put gates that only ever narrow the choice, because in merge mode
every merge raises the shared memory's score on all text (docs/experiments.md, "The key gate"):

* key gate: one prompt token within cosine ``key_gate`` of one of the memory's keys (stored
  activations of its edits' prompts);
* coverage gate: one of the memory's edits covered, the mean over its keys of each key's
  best cosine with a prompt token at least ``coverage_gate``;
* subject gate: the prompt's text names one of the memory's edits' subjects (edits without
  a subject keep the key and coverage gates).

The functions are plain tensor maths; ``Router`` holds the routing settings, the per-call
context that the model-level hook prepares (``RouteContext``) and the decision held while
generating.  It reads the memory's tensors from the layer (``MemoryBank``) and never
writes them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn.functional as F

from .maths import activation_score, project_out, scored_tokens
from .subjects import SentenceSubjects, prompt_texts, subject_open

NO_MEMORY = -1  # route index meaning "main memory"
# From this many memories (retrieve mode at T=1000 holds 100) D_k a is computed only for the
# memories the gates leave open, and only the chosen ones are applied: all of them on every
# token cost more than the base model.  Below it nothing syncs with the host, which a GPU prefers.
SELECTIVE_FROM = 8


@dataclass(frozen=True)
class RouterConfig:
    """How the router decides; derived from ``WiseConfig`` by ``from_config``, nowhere else."""

    pooling: str          # "max" or "mean" (the paper's) over the prompt's token scores
    hold: bool            # keep the prompt's decision for generated tokens
    key_gate: float       # 0: off
    coverage_gate: float  # 0: off (and off whenever key_gate is)
    subject_gate: bool

    @classmethod
    def plain(cls) -> "RouterConfig":
        """The paper's router, scores alone: what a layer routes by before it is configured."""
        return cls(pooling="mean", hold=True, key_gate=0.0, coverage_gate=0.0, subject_gate=False)

    @classmethod
    def from_config(cls, cfg) -> "RouterConfig":  # cfg: wisecli.methods.wise.config.WiseConfig
        return cls(pooling=cfg.score_pooling, hold=cfg.hold_routing, key_gate=cfg.key_gate,
                   coverage_gate=cfg.coverage_gate, subject_gate=cfg.subject_gate)


@dataclass(frozen=True)
class RouteContext:
    """What one model call tells the router beyond the layer's input, prepared once per call.

    token_mask (B, T): the tokens a score reads (the prompt; never padding, nor a
    teacher-forced answer); decoding: a generation step after the prompt; named (K, B) /
    keyed (K,): the subject gate's answer for this call's prompts (``subjects.subject_open``),
    None when the gate has nothing to say.
    """

    token_mask: torch.Tensor | None = None
    decoding: bool = False
    named: torch.Tensor | None = None
    keyed: torch.Tensor | None = None
    ids: torch.Tensor | None = None  # (B, T) the call's input ids (a generated token when decoding)

    def mask_for(self, t: int) -> torch.Tensor | None:
        """The mask over the last ``t`` positions (a decode step sees one new token)."""
        m = self.token_mask
        if m is None:
            return None
        return m[:, -t:] if m.shape[1] >= t else None


class MemoryBank(Protocol):
    """The side-memory tensors the router reads (``SideMemoryLayer`` buffers)."""

    memories: torch.Tensor
    thresholds: torch.Tensor
    scale: torch.Tensor
    basis: torch.Tensor
    edit_keys: torch.Tensor
    key_edit: torch.Tensor
    key_memory: torch.Tensor
    edit_subjects: list[tuple[int, str | None]]

    @property
    def n_memories(self) -> int: ...


# ---- the maths ------------------------------------------------------------------------------

def choose_memory(scores: torch.Tensor, thresholds: torch.Tensor,
                  rank: torch.Tensor | None = None) -> torch.Tensor:
    """Top-1 routing: per example, the memory that clears its threshold by the widest factor.

    scores: (K, B); thresholds: (K,).  Returns (B,) long, NO_MEMORY where none clears.
    Compared by score / threshold, not raw score: each memory's scores live on their own
    scale, and the raw maximum sent edits to the wrong memory (ZsRE T=100 retrieve: rel 0.60).
    ``rank`` (K, B), when given, orders the memories that clear instead (key coverage).
    No ``.item()``: it batches and never stalls a GPU.
    """
    if scores.shape[0] == 0:
        return torch.full(scores.shape[1:], NO_MEMORY, dtype=torch.long, device=scores.device)
    above = scores > thresholds[:, None]
    if rank is None:
        rank = scores / thresholds.clamp_min(1e-6)[:, None]
    masked = torch.where(above, rank.to(scores.dtype), torch.full_like(scores, float("-inf")))
    best = masked.argmax(dim=0)
    return torch.where(above.any(dim=0), best, torch.full_like(best, NO_MEMORY))


def key_similarity(acts: torch.Tensor, token_mask: torch.Tensor | None, keys: torch.Tensor,
                   key_memory: torch.Tensor, n_memories: int) -> torch.Tensor:
    """Per memory, the best cosine between any scored token of a prompt and any of its keys.

    acts: (B, T, d_in) projected activations; keys: (M, d_in) unit-norm, projected alike;
    key_memory: (M,).  Returns (K, B), -1 for a memory with no key.  Unlike ‖D a‖ this does
    not grow as a merged memory takes in edits: a key is fixed when its edit is made.
    """
    return _per_memory(_best_token(acts, token_mask, keys), key_memory, n_memories)


def key_coverage(acts: torch.Tensor, token_mask: torch.Tensor | None, keys: torch.Tensor,
                 key_edit: torch.Tensor, key_memory: torch.Tensor, n_memories: int) -> torch.Tensor:
    """Per memory, the best over its edits of the mean over the edit's keys of each key's best
    cosine with a prompt token.  The single closest key is often a word another edit shares;
    a rephrase matches most of its own edit's keys.  Returns (K, B)."""
    return key_match(acts, token_mask, keys, key_memory, n_memories, edit_index(key_edit))[1]


def edit_index(key_edit: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Each key's edit renumbered 0..E-1, and E.  Worth caching: ``torch.unique`` syncs a GPU."""
    edits, owner = torch.unique(key_edit, return_inverse=True)
    return owner, edits.numel()


def key_match(acts: torch.Tensor, token_mask: torch.Tensor | None, keys: torch.Tensor,
              key_memory: torch.Tensor, n_memories: int,
              edit_owner: tuple[torch.Tensor, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``key_similarity`` and, given ``edit_owner``, ``key_coverage``, from one token-by-key
    product.  Without ``edit_owner`` the second tensor is the first."""
    best = _best_token(acts, token_mask, keys)  # (B, M)
    sims = _per_memory(best, key_memory, n_memories)
    if edit_owner is None:
        return sims, sims
    owner, n_edits = edit_owner
    index = owner[None].expand(best.shape[0], -1)
    per_edit = torch.zeros(best.shape[0], n_edits, device=best.device).scatter_reduce(
        1, index, best, reduce="mean", include_self=False)
    return sims, _per_memory(per_edit.gather(1, index), key_memory, n_memories)


def _best_token(acts: torch.Tensor, token_mask: torch.Tensor | None, keys: torch.Tensor) -> torch.Tensor:
    """(B, M): each key's best cosine with a scored token of each prompt."""
    sim = F.normalize(acts.float(), dim=-1) @ keys.float().T  # (B, T, M)
    m = scored_tokens(token_mask, sim[..., 0])
    return sim.masked_fill(m[..., None] == 0, -1.0).amax(dim=1)


def _per_memory(per_key: torch.Tensor, key_memory: torch.Tensor, n_memories: int) -> torch.Tensor:
    """(B, M) values per key -> (K, B), the largest over each memory's keys."""
    out = torch.full((n_memories, per_key.shape[0]), -1.0, device=per_key.device)
    index = key_memory[:, None].expand(-1, per_key.shape[0])
    return out.scatter_reduce(0, index, per_key.T, reduce="amax", include_self=True)


def route_names(route: torch.Tensor) -> list[str]:
    return ["main" if int(r) == NO_MEMORY else f"side[{int(r)}]" for r in route.tolist()]


# ---- the router -----------------------------------------------------------------------------

DeltaOut = Callable[[int], torch.Tensor]  # k -> D_k a for this call's input, (B, T, d_out)


class Router:
    """Routing settings, the per-call context, and the decision of the last prompt."""

    def __init__(self, cfg: RouterConfig, tokenizer: Any = None) -> None:
        self.cfg = cfg
        # The subject gate reads the prompt's text (decoded once per call) and follows generated
        # text on token ids; without a tokenizer, keys decide.
        self.decode = (lambda ids: tokenizer.decode(ids, skip_special_tokens=True)) if tokenizer is not None else None
        self.sentences = SentenceSubjects(tokenizer) if tokenizer is not None else None
        self._recent: torch.Tensor | None = None     # (B, m) the last generated tokens
        self._sentence: torch.Tensor | None = None   # (K, B) memories the current sentence names
        self._track: torch.Tensor | None = None      # (B, E') targets a row's answer may still be
        self._pos: torch.Tensor | None = None        # (B,) tokens of the answer generated so far
        self._shut: torch.Tensor | None = None       # (K, B) answered already in this sentence
        self._next: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # this step's (going, alive, pos)
        self._ids: torch.Tensor | None = None        # (B, n) the text so far: the prompt, then each new token
        self._cached: torch.Tensor | None = None     # (B, n) the text whose states the cache holds
        self._refresh: torch.Tensor | None = None    # (B,) rows whose answer was just written
        self.held: torch.Tensor | None = None         # (B,) the prompt's route, kept while decoding
        self.answered: torch.Tensor | None = None     # (B,) first memory used since the prompt
        self.last_route: torch.Tensor | None = None   # (B,) of the last call (None: not routed)
        self.last_scores: torch.Tensor | None = None  # (K, B) gated scores of the last decision
        self._prompt_named: tuple[torch.Tensor, torch.Tensor] | None = None
        self._unit_keys: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._edit_owner: tuple[torch.Tensor, tuple[torch.Tensor, int]] | None = None

    def configure(self, cfg: RouterConfig) -> None:
        self.cfg, self.held, self._prompt_named, self._sentence = cfg, None, None, None

    # ---- per call ----------------------------------------------------------------------------
    def context(self, input_ids: torch.Tensor | None, token_mask: torch.Tensor | None,
                decoding: bool, bank: MemoryBank | None) -> RouteContext:
        """The call's context; ``bank`` None when nothing will be routed (training, no
        memories), so no text is decoded.  A decode step keeps the prompt's subject answer:
        one new token names nothing."""
        self.last_route = None
        named = None
        if bank is not None and self.cfg.subject_gate and bank.edit_subjects and self.decode is not None:
            batch = next((t.shape[0] for t in (input_ids, token_mask) if t is not None), None)
            kept = self._prompt_named
            if decoding and kept is not None and kept[0].shape[1] == batch:
                named = self._follow(input_ids, kept, bank) if not self.cfg.hold else kept
            elif input_ids is not None:
                named = self._read_prompt(input_ids, token_mask, bank)
        if bank is not None and not self.cfg.hold:
            self._note_text(input_ids, decoding, bank)
        return RouteContext(token_mask, decoding, *(named or (None, None)), ids=input_ids)

    def _note_text(self, ids: torch.Tensor | None, decoding: bool, bank: MemoryBank) -> None:
        """Keep the text the cache holds, and follow the answers being written (``_advance``)."""
        self._next = self._refresh = None
        if ids is None:
            self._ids = self._cached = None
            return
        if not decoding or self._ids is None or self._ids.shape[0] != ids.shape[0]:
            self._ids, self._cached = ids, None
            return
        self._cached, self._ids = self._ids, torch.cat([self._ids, ids.to(self._ids.device)], dim=1)
        held = self.held
        if self._track is not None and held is not None and self._track.shape[0] == held.shape[0] == ids.shape[0]:
            self._advance(ids[:, -1].to(held.device), held, bank)

    def refresh_rows(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rows whose memory has just written its answer, and the text the cache holds.

        The memory acted on every prompt position, so the cached keys and values above its
        layer carry the edit, and the unedited weights read it back after the answer
        ("Essex Essex Essex"): those rows' cache is to be recomputed without the memory.
        One host sync per generated token while a memory may answer (transformers' own
        stopping check already syncs each step)."""
        rows, self._refresh = self._refresh, None
        if rows is None or self._cached is None or not bool(rows.any()):
            return None
        return rows, self._cached

    def _read_prompt(self, ids: torch.Tensor, mask: torch.Tensor | None,
                     bank: MemoryBank) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt's subject answer (its text, decoded once); and, for generation that is not
        held, what its last sentence names, from which generated tokens are followed."""
        found, keyed = subject_open(prompt_texts(ids, mask, self.decode), bank.edit_subjects, bank.n_memories)
        dev = bank.memories.device
        self._prompt_named = (found.to(dev), keyed.to(dev))
        if not self.cfg.hold and self.sentences is not None:
            span = self.sentences.span(bank.edit_subjects, ids.device)
            self._recent = torch.nn.functional.pad(ids, (max(0, span - ids.shape[1]), 0), value=-1)[:, -span:]
            self._sentence = self.sentences.in_sentence(ids, mask, bank.edit_subjects, bank.n_memories).to(dev)
        return self._prompt_named

    def _follow(self, ids: torch.Tensor | None, kept: tuple[torch.Tensor, torch.Tensor],
                bank: MemoryBank) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A generation step's subject answer: what the current sentence of the text so far names."""
        if ids is None or self._sentence is None or self._recent is None or self._recent.shape[0] != ids.shape[0]:
            return kept
        self._recent, sentence = self.sentences.step(self._recent, ids[:, -1:].to(self._recent.device),
                                                     self._sentence.to(ids.device), bank.edit_subjects)
        self._sentence = sentence.to(bank.memories.device)
        return self._sentence, kept[1]

    def route(self, a32: torch.Tensor, ctx: RouteContext, bank: MemoryBank, delta_out: DeltaOut) -> torch.Tensor:
        """(B,) memory index per example, NO_MEMORY for the main memory.

        Held (``hold_routing``): the prompt decides for every generated token.  Otherwise each
        generated token is routed on its own, except that a memory keeps answering while the
        text follows one of its edits' targets, and once it has answered it stays shut until
        the sentence ends: a reply can reach an edited fact ("The capital of Australia is")
        and move on after the answer instead of repeating it."""
        held = self.held
        if ctx.decoding and held is not None and held.shape[0] == a32.shape[0]:
            route = held if self.cfg.hold else self._step(a32, ctx, bank, delta_out, held)
            if self.answered is not None and self.answered.shape == route.shape:
                self.answered = torch.where(self.answered >= 0, self.answered, route)
        else:
            route = self._decide(a32, ctx, bank, delta_out)
            if not self.cfg.hold:
                self._start(route, bank)
            self.answered = route
        self.held = self.last_route = route
        return route

    def _start(self, route: torch.Tensor, bank: MemoryBank) -> None:
        """After a prompt: rows routed to a memory follow its edits' targets from their start."""
        if self.sentences is None or not bank.edit_targets:
            self._track = None
            return
        _, _, owner = self.sentences.targets(bank.edit_targets, route.device)
        self._track = (owner[None, :] == route[:, None]) & (route[:, None] >= 0)
        self._pos = torch.zeros_like(route)
        self._shut = torch.zeros(bank.n_memories, route.shape[0], dtype=torch.bool, device=route.device)

    def _advance(self, y: torch.Tensor, held: torch.Tensor, bank: MemoryBank) -> None:
        """Before a generated token's forward: does it go on writing an edit's target, or
        complete one (that memory shut until the sentence ends, the row's cache refreshed)?"""
        table, lengths, _ = self.sentences.targets(bank.edit_targets, held.device)
        col = table.gather(1, self._pos.clamp(max=table.shape[1] - 1)[None, :].expand(table.shape[0], -1)).T
        alive = self._track & (col == y[:, None]) & (self._pos[:, None] < lengths[None, :])
        pos = self._pos + 1
        complete = (alive & (lengths[None, :] == pos[:, None])).any(1) & (held >= 0)
        going = (held >= 0) & alive.any(1) & ~complete
        done = torch.nn.functional.one_hot(held.clamp(min=0), bank.n_memories).T.bool() & complete[None]
        ends = self.sentences.boundary(held.device)
        self._shut = (self._shut | done) & ~ends[y.clamp(0, ends.numel() - 1)][None, :]
        self._next, self._refresh = (going, alive, pos), complete

    def _step(self, a32: torch.Tensor, ctx: RouteContext, bank: MemoryBank, delta_out: DeltaOut,
              held: torch.Tensor) -> torch.Tensor:
        """One generated token: keep an answer that is still being written, else route afresh."""
        step = self._next
        if step is None or step[0].shape[0] != held.shape[0]:
            return self._decide(a32, ctx, bank, delta_out)
        going, alive, pos = step
        _, _, owner = self.sentences.targets(bank.edit_targets, held.device)
        fresh = self._decide(a32, ctx, bank, delta_out, shut=self._shut)
        route = torch.where(going, held, fresh)
        started = (route >= 0) & ~going
        self._track = torch.where(going[:, None], alive, (owner[None, :] == route[:, None]) & started[:, None])
        self._pos = torch.where(going, pos, torch.zeros_like(pos))
        return route

    def _decide(self, a32: torch.Tensor, ctx: RouteContext, bank: MemoryBank, delta_out: DeltaOut,
                shut: torch.Tensor | None = None) -> torch.Tensor:
        mask = ctx.mask_for(a32.shape[1])
        open_, rank = self._key_gates(a32, mask, bank)
        named = ctx.named if ctx.named is not None and ctx.named.shape[1] == a32.shape[0] else None
        if named is not None:  # the subject gate; the key gates only for edits without a subject
            key_open = open_ if open_ is not None else torch.ones_like(named)
            open_ = named | (ctx.keyed[:, None] & key_open)
        if shut is not None:
            open_ = (open_ if open_ is not None else torch.ones_like(shut)) & ~shut
        scores = self._scores(a32.shape[0], mask, open_, bank, delta_out)
        self.last_scores = scores
        return choose_memory(scores, bank.thresholds, rank)

    def _key_gates(self, a32: torch.Tensor, mask: torch.Tensor | None,
                   bank: MemoryBank) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(K, B) memories the key and coverage gates leave open, and what ranks them (key
        coverage with several memories); (None, None) when the key gate is off."""
        cfg = self.cfg
        if cfg.key_gate <= 0 or bank.edit_keys.shape[0] == 0:
            return None, None
        by_cover = bank.n_memories > 1
        owner = self._owner(bank) if by_cover or cfg.coverage_gate > 0 else None
        sims, cover = key_match(project_out(a32, bank.basis), mask, self._keys(bank), bank.key_memory,
                                bank.n_memories, owner)
        open_ = sims >= cfg.key_gate
        if cfg.coverage_gate > 0:
            open_ = open_ & (cover >= cfg.coverage_gate)
        return open_, (cover if by_cover else sims)

    def _scores(self, batch: int, mask: torch.Tensor | None, open_: torch.Tensor | None,
                bank: MemoryBank, delta_out: DeltaOut) -> torch.Tensor:
        """(K, B) scores in units of ``scale``, zero where a gate is shut."""
        k_all = bank.n_memories
        candidates: Sequence[int] = range(k_all)
        if k_all >= SELECTIVE_FROM and open_ is not None:  # a shut memory scores 0 anyway
            candidates = open_.any(dim=1).nonzero().flatten().tolist()
        scores = torch.zeros(k_all, batch, device=bank.memories.device)
        for k in candidates:
            scores[k] = activation_score(delta_out(k), mask, self.cfg.pooling) / bank.scale
        if open_ is not None:
            scores = torch.where(open_, scores, torch.zeros_like(scores))
        return scores

    def applied(self, route: torch.Tensor, n_memories: int) -> Sequence[int]:
        """The memories whose output the layer adds: all of them (no host sync), or from
        SELECTIVE_FROM on only those some row is routed to (one sync, no K-fold matmul)."""
        if n_memories < SELECTIVE_FROM:
            return range(n_memories)
        return [k for k in route.unique().tolist() if k != NO_MEMORY]

    # ---- caches of what the keys give, rebuilt when a merge replaces the tensors -------------
    def _keys(self, bank: MemoryBank) -> torch.Tensor:
        """The keys as the gate reads them: projected like the activations, unit norm."""
        c = self._unit_keys
        if c is None or c[0] is not bank.edit_keys or c[1] is not bank.basis:
            unit = F.normalize(project_out(bank.edit_keys.float(), bank.basis), dim=-1)
            c = self._unit_keys = (bank.edit_keys, bank.basis, unit)
        return c[2]

    def _owner(self, bank: MemoryBank) -> tuple[torch.Tensor, int]:
        c = self._edit_owner
        if c is None or c[0] is not bank.key_edit:
            c = self._edit_owner = (bank.key_edit, edit_index(bank.key_edit))
        return c[1]
