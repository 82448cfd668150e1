"""One generation's routing state: created when a prompt is routed, carried through the
decode steps, dropped with the generation's cache.

Routing a generated token needs what the text so far has done: which subjects the current
sentence names, which edit's target the reply is writing and how far it has got, which
memories have answered in this sentence, which rows have just finished an answer (their
cache is to be refreshed), the text and the residual stream that the cache holds.  All of
it belongs to one generation, so it lives in one object per generation (transformers keeps
its keys and values the same way, in the ``Cache`` it hands from step to step).  The
model-level hook finds a decode step's generation by that cache (``Generations``), never by
guessing from batch shapes.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .subjects import SentenceSubjects

Named = tuple[torch.Tensor, torch.Tensor]  # (E, B) edits whose subject the text names, (E,) edits without one


class Generation:
    """What routing remembers between the calls of one generation (rows are the batch's).

    ``held`` is the last call's route and ``answered`` the first memory each row was routed
    to; the rest is kept only while generated tokens are routed one by one (not under
    ``hold_routing``) and the layer's edits have targets to follow (``follows``).
    """

    def __init__(self, ids: torch.Tensor | None, follows: bool) -> None:
        self.follows = follows and ids is not None
        self.ids = ids if self.follows else None          # (B, n) the text so far
        self.cached: torch.Tensor | None = None            # (B, n) the text whose states the cache holds
        self.named: Named | None = None                    # the prompt's subject answer
        self.recent: torch.Tensor | None = None            # (B, m) the last tokens, for subjects
        self.sentence: torch.Tensor | None = None          # (E, B) edits whose subject the current sentence names
        self.held: torch.Tensor | None = None              # (B,) the last call's route
        self.answered: torch.Tensor | None = None          # (B,) first memory used since the prompt
        self.track: torch.Tensor | None = None             # (B, E') targets a row's answer may still be
        self.pos: torch.Tensor | None = None               # (B,) tokens of the answer written so far
        self.shut: torch.Tensor | None = None              # (K, B) answered already in this sentence
        self.going: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # this step's (going, alive, pos)
        self.refresh: torch.Tensor | None = None           # (B,) rows whose answer was just written
        self._hidden: torch.Tensor | None = None           # (B, capacity, d) what entered the memory's block
        self._hidden_len = 0

    # ---- the prompt ----------------------------------------------------------------------
    def read_prompt(self, named: Named, sentences: SentenceSubjects | None, ids: torch.Tensor,
                    mask: torch.Tensor | None, subjects: Sequence[tuple[int, str | None]],
                    n_owners: int, device: torch.device) -> None:
        """The prompt's subject answer per edit, and what its last sentence names (from which the
        generated tokens are followed, when they are routed one by one)."""
        self.named = named
        if sentences is not None:
            span = sentences.span(subjects, ids.device)
            self.recent = F.pad(ids, (max(0, span - ids.shape[1]), 0), value=-1)[:, -span:]
            self.sentence = sentences.in_sentence(ids, mask, subjects, n_owners).to(device)

    def prompt_routed(self, route: torch.Tensor, sentences: SentenceSubjects | None,
                      targets: Sequence[tuple[int, str]], n_memories: int) -> None:
        """After a prompt: rows routed to a memory follow its edits' targets from their start."""
        self.held = self.answered = route
        if not self.follows or sentences is None or not targets:
            return
        _, _, owner = sentences.targets(targets, route.device)
        self.track = (owner[None, :] == route[:, None]) & (route[:, None] >= 0)
        self.pos = torch.zeros_like(route)
        self.shut = torch.zeros(n_memories, route.shape[0], dtype=torch.bool, device=route.device)

    # ---- each decode step, before its forward ------------------------------------------
    def follow_sentence(self, ids: torch.Tensor | None, sentences: SentenceSubjects,
                        subjects: Sequence[tuple[int, str | None]], device: torch.device) -> Named | None:
        """A decode step's subject answer: what the current sentence of the text so far names."""
        kept = self.named
        if kept is None or ids is None or self.sentence is None or self.recent is None:
            return kept
        self.recent, sentence = sentences.step(self.recent, ids[:, -1:].to(self.recent.device),
                                               self.sentence.to(ids.device), subjects)
        self.sentence = sentence.to(device)
        return self.sentence, kept[1]

    def note_token(self, ids: torch.Tensor | None, sentences: SentenceSubjects | None,
                   targets: Sequence[tuple[int, str]], n_memories: int) -> None:
        """Keep the text the cache holds, and follow the answers being written (``_advance``)."""
        self.going = self.refresh = None
        if ids is None:
            self.ids = self.cached = None
        if self.ids is None:
            return
        self.cached, self.ids = self.ids, torch.cat([self.ids, ids.to(self.ids.device)], dim=1)
        if self.track is not None and self.held is not None and sentences is not None:
            self._advance(ids[:, -1].to(self.held.device), sentences, targets, n_memories)

    def _advance(self, y: torch.Tensor, sentences: SentenceSubjects, targets: Sequence[tuple[int, str]],
                 n_memories: int) -> None:
        """Does the new token go on writing an edit's target, or complete one (that memory
        shut until the sentence ends, the row's cache refreshed)?"""
        held = self.held
        table, lengths, _ = sentences.targets(targets, held.device)
        col = table.gather(1, self.pos.clamp(max=table.shape[1] - 1)[None, :].expand(table.shape[0], -1)).T
        alive = self.track & (col == y[:, None]) & (self.pos[:, None] < lengths[None, :])
        pos = self.pos + 1
        complete = (alive & (lengths[None, :] == pos[:, None])).any(1) & (held >= 0)
        going = (held >= 0) & alive.any(1) & ~complete
        done = F.one_hot(held.clamp(min=0), n_memories).T.bool() & complete[None]
        ends = sentences.boundary(held.device)
        self.shut = (self.shut | done) & ~ends[y.clamp(0, ends.numel() - 1)][None, :]
        self.going, self.refresh = (going, alive, pos), complete

    def take_refresh(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rows whose memory has just written its answer, and the text the cache holds.

        The memory acted on every prompt position, so the cached keys and values above its
        layer carry the edit, and the unedited weights read it back after the answer
        ("Essex Essex Essex"): those rows' cache is to be recomputed without the memory.
        One host sync per generated token while a memory may answer (transformers' own
        stopping check already syncs each step)."""
        rows, self.refresh = self.refresh, None
        if rows is None or self.cached is None or not bool(rows.any()):
            return None
        return rows, self.cached

    # ---- each decode step, the route ---------------------------------------------------
    def step_route(self, decide: Callable[[torch.Tensor | None], torch.Tensor],
                   sentences: SentenceSubjects | None, targets: Sequence[tuple[int, str]]) -> torch.Tensor:
        """One generated token: keep an answer that is still being written, else route afresh
        (``decide``, given the memories shut in this sentence)."""
        step = self.going
        if step is None or sentences is None:
            route = decide(None)
        else:
            going, alive, pos = step
            _, _, owner = sentences.targets(targets, self.held.device)
            route = torch.where(going, self.held, decide(self.shut))
            started = (route >= 0) & ~going
            self.track = torch.where(going[:, None], alive, (owner[None, :] == route[:, None]) & started[:, None])
            self.pos = torch.where(going, pos, torch.zeros_like(pos))
        self.routed(route)
        return route

    def routed(self, route: torch.Tensor) -> None:
        """A decode step's route: the first memory each row used is the one that answered."""
        if self.answered is not None and self.answered.shape == route.shape:
            self.answered = torch.where(self.answered >= 0, self.answered, route)
        self.held = route

    # ---- the residual stream the cache holds ---------------------------------------------
    def record_hidden(self, h: torch.Tensor, cached_len: int) -> None:
        """Keep the residual stream entering the memory's block at every position the cache
        holds (a growing buffer: appending to a tensor each token would copy the whole
        history each token).  A cache that does not hold what was recorded drops it."""
        buf = self._hidden
        if buf is None or buf.shape[0] != h.shape[0] or cached_len != self._hidden_len:
            buf, self._hidden_len = None, 0
        need = self._hidden_len + h.shape[1]
        if buf is None or buf.shape[1] < need or buf.dtype != h.dtype:
            grown = h.new_empty(h.shape[0], max(need, 2 * self._hidden_len, 64), h.shape[2])
            if buf is not None and self._hidden_len:
                grown[:, :self._hidden_len] = buf[:, :self._hidden_len]
            buf = grown
        buf[:, self._hidden_len:need] = h.detach()
        self._hidden, self._hidden_len = buf, need

    def drop_hidden(self) -> None:
        self._hidden, self._hidden_len = None, 0

    @property
    def hidden(self) -> torch.Tensor | None:
        return None if self._hidden is None else self._hidden[:, :self._hidden_len]


# ---- a batch that changes while it runs (a server's continuous batching) ------------------

ROW_FIELDS = ("held", "answered", "track", "pos")  # (B, ...) tensors
MEMORY_FIELDS = ("sentence", "shut")               # (K, B) tensors
TEXT_FIELDS = ("ids", "recent")                    # (B, n) tensors, padded on the left
# ``cached``, ``refresh`` and ``going`` are set and used within one call: between calls they
# are stale, and the next call sets them afresh.


def select_rows(gen: Generation, rows: torch.Tensor) -> None:
    """Keep only ``rows`` of the generation (its finished rows leave the batch)."""
    for name in ROW_FIELDS + TEXT_FIELDS:
        value = getattr(gen, name)
        if value is not None:
            setattr(gen, name, value[rows.to(value.device)])
    for name in MEMORY_FIELDS:
        value = getattr(gen, name)
        if value is not None:
            setattr(gen, name, value[:, rows.to(value.device)])
    if gen.named is not None:
        gen.named = (gen.named[0][:, rows.to(gen.named[0].device)], gen.named[1])
    gen.going = gen.refresh = gen.cached = None
    hidden = gen.hidden
    gen.drop_hidden()
    if hidden is not None:
        gen.record_hidden(hidden[rows.to(hidden.device)], 0)


def join_rows(gen: Generation, other: Generation, width: int) -> bool:
    """Append ``other``'s rows to ``gen``'s, both between two calls; the text each holds is
    padded on the left to ``width`` tokens (the joined cache's length).  False, changing
    nothing, where the two do not keep the same state (they cannot share a batch)."""
    names = ROW_FIELDS + TEXT_FIELDS + MEMORY_FIELDS
    if gen.follows != other.follows or any((getattr(gen, n) is None) != (getattr(other, n) is None) for n in names) \
            or (gen.named is None) != (other.named is None):
        return False
    for name in ROW_FIELDS:
        a, b = getattr(gen, name), getattr(other, name)
        if a is not None:
            setattr(gen, name, torch.cat([a, b.to(a.device)]))
    for name in MEMORY_FIELDS:
        a, b = getattr(gen, name), getattr(other, name)
        if a is not None:
            setattr(gen, name, torch.cat([a, b.to(a.device)], dim=1))
    for name, fill in (("ids", 0), ("recent", -1)):
        a, b = getattr(gen, name), getattr(other, name)
        if a is not None:
            n = width if name != "recent" else max(a.shape[1], b.shape[1])
            setattr(gen, name, torch.cat([_left(a, n, fill), _left(b.to(a.device), n, fill)]))
    if gen.named is not None:
        gen.named = (torch.cat([gen.named[0], other.named[0].to(gen.named[0].device)], dim=1), gen.named[1])
    gen.going = gen.refresh = gen.cached = None
    a, b = gen.hidden, other.hidden
    gen.drop_hidden()
    if a is not None and b is not None:
        gen.record_hidden(torch.cat([_left(a, width, 0), _left(b.to(a.device), width, 0)]), 0)
    return True


def _left(t: torch.Tensor, n: int, fill: float) -> torch.Tensor:
    """``t`` (B, m, ...) padded on the left of its second dimension to ``n``."""
    if t.shape[1] >= n:
        return t
    pad = t.new_full((t.shape[0], n - t.shape[1], *t.shape[2:]), fill)
    return torch.cat([pad, t], dim=1)


class Generations:
    """The generations in flight, each found by the cache object that carries it.

    Weak references: a generation is dropped with its cache, so nothing outlives the
    ``generate`` call (or hand-written decoding loop) it belongs to."""

    def __init__(self) -> None:
        self._by_cache: dict[int, tuple[weakref.ref, Generation]] = {}

    def find(self, cache: Any) -> Generation | None:
        entry = self._by_cache.get(id(cache)) if cache is not None else None
        return entry[1] if entry is not None and entry[0]() is cache else None

    def bind(self, cache: Any, generation: Generation) -> None:
        """``generation`` goes on in the decode steps given ``cache`` (a cache that cannot be
        referenced weakly carries none: its decode steps are routed as prompts)."""
        key = id(cache)
        try:
            ref = weakref.ref(cache, lambda _r, k=key: self._by_cache.pop(k, None))
        except TypeError:
            return
        self._by_cache[key] = (ref, generation)
