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
  a subject keep the key and coverage gates);
* answer gate: and, for that same edit, the prompt's answer position (its last token, or
  the token being generated) lies within cosine ``answer_gate`` of one of the edit's answer
  keys.  A merged memory answers by relation, so opening it because a prompt names an
  edited subject lets every edit with the prompt's relation answer for that subject; the
  answer position is where a prompt's relation shows ("The founder of X is" against "The
  CEO of X is"), and the decision is the edit's, not the memory's.  An edit may also hold
  "other keys", the answer positions of other relations of its subject; a position nearer
  one of those than to every answer key of the edit stays shut (a cosine alone let most
  other-relation chat questions through: the reply's start is alike for all of them).

The maths is plain tensor functions in ``gates.py``; ``Router`` holds the routing settings and makes each
call's decision from the context that the model-level hook prepares (``RouteContext``),
which carries the ``Generation`` a decode step belongs to.  It reads the memory's tensors
from the layer (``MemoryBank``) and never writes them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn.functional as F

from .maths import activation_score, answer_match, last_token, project_out
from .gates import NO_MEMORY, choose_memory, edit_index, key_match
from .generation import Generation
from .subjects import SentenceSubjects, prompt_texts, subject_open

# From this many memories (retrieve mode at T=1000 holds 100) D_k a is computed only for the
# memories the gates leave open, and only the chosen ones are applied: all of them on every
# token cost more than the base model.  Below it nothing syncs with the host, which a GPU prefers.
SELECTIVE_FROM = 8
# From this many keys (thousands of edits) the subject gate narrows which keys are compared at
# all: at T=10,000 comparing every token with every key cost more than the model's own layers.
SELECTIVE_KEYS = 1024


@dataclass(frozen=True)
class RouterConfig:
    """How the router decides; derived from ``WiseConfig`` by ``from_config``, nowhere else."""

    pooling: str          # "max" or "mean" (the paper's) over the prompt's token scores
    hold: bool            # keep the prompt's decision for generated tokens
    key_gate: float       # 0: off
    coverage_gate: float  # 0: off (and off whenever key_gate is)
    subject_gate: bool
    answer_gate: float = 0.0  # 0: off; only with the subject gate

    @classmethod
    def plain(cls) -> "RouterConfig":
        """The paper's router, scores alone: what a layer routes by before it is configured."""
        return cls(pooling="mean", hold=True, key_gate=0.0, coverage_gate=0.0, subject_gate=False)

    @classmethod
    def from_config(cls, cfg) -> "RouterConfig":  # cfg: wisecli.methods.wise.config.WiseConfig
        return cls(pooling=cfg.score_pooling, hold=cfg.hold_routing, key_gate=cfg.key_gate,
                   coverage_gate=cfg.coverage_gate, subject_gate=cfg.subject_gate,
                   answer_gate=cfg.answer_gate)


@dataclass(frozen=True)
class RouteContext:
    """What one model call tells the router beyond the layer's input, prepared once per call.

    token_mask (B, T): the tokens a score reads (the prompt; never padding, nor a
    teacher-forced answer); decoding: a decode step of ``generation`` (whose prompt was
    routed; False for a prompt, which starts ``generation``); named (E, B) /
    keyed (E,): the subject gate's answer per edit for this call's prompts
    (``subjects.subject_open``), None when the gate has nothing to say.
    """

    token_mask: torch.Tensor | None = None
    decoding: bool = False
    named: torch.Tensor | None = None
    keyed: torch.Tensor | None = None
    ids: torch.Tensor | None = None  # (B, T) the call's input ids (a generated token when decoding)
    generation: Generation | None = None  # the generation this call starts or continues

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
    answer_keys: torch.Tensor
    answer_key_edit: torch.Tensor
    other_keys: torch.Tensor
    other_key_edit: torch.Tensor
    edit_subjects: list[tuple[int, str | None]]
    edit_targets: list[tuple[int, str]]

    @property
    def n_memories(self) -> int: ...


# ---- the router -----------------------------------------------------------------------------

DeltaOut = Callable[[int], torch.Tensor]  # k -> D_k a for this call's input, (B, T, d_out)


class Router:
    """Routing settings and each call's decision.  What a decision depends on from earlier
    calls of the same generation is the ``Generation`` the call's context carries."""

    def __init__(self, cfg: RouterConfig, tokenizer: Any = None) -> None:
        self.cfg = cfg
        # The subject gate reads the prompt's text (decoded once per call) and follows generated
        # text on token ids; without a tokenizer, keys decide.
        self.decode = (lambda ids: tokenizer.decode(ids, skip_special_tokens=True)) if tokenizer is not None else None
        self.sentences = SentenceSubjects(tokenizer) if tokenizer is not None else None
        self.last_route: torch.Tensor | None = None   # (B,) of the last call (None: not routed)
        self.last_scores: torch.Tensor | None = None  # (K, B) gated scores of the last decision
        # What the keys give, rebuilt when a merge replaces the tensors.
        self._units: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._edit_owner: tuple[torch.Tensor, tuple[torch.Tensor, int]] | None = None
        self._per_edit: tuple[list, int, list[tuple[int, str | None]], torch.Tensor] | None = None
        self._no_answer: tuple[torch.Tensor, int, torch.Tensor] | None = None

    def configure(self, cfg: RouterConfig) -> None:
        self.cfg = cfg

    # ---- per call ----------------------------------------------------------------------------
    def context(self, input_ids: torch.Tensor | None, token_mask: torch.Tensor | None,
                generation: Generation | None, bank: MemoryBank) -> RouteContext:
        """The call's context: a decode step of ``generation``, or (None) a prompt, which
        starts a generation of its own.  A decode step keeps the prompt's subject answer, or
        follows the sentence being written: one new token names nothing by itself."""
        self.last_route = None
        reads_text = self.cfg.subject_gate and bool(bank.edit_subjects) and self.decode is not None
        follow = None if self.cfg.hold else self.sentences
        if generation is None:
            generation = Generation(input_ids, follows=not self.cfg.hold and bool(bank.edit_targets))
            if reads_text and input_ids is not None:
                subjects = self._edits(bank)[0]
                found, keyed = subject_open(prompt_texts(input_ids, token_mask, self.decode), subjects,
                                            len(subjects))
                dev = bank.memories.device
                generation.read_prompt((found.to(dev), keyed.to(dev)), follow, input_ids, token_mask,
                                       subjects, len(subjects), dev)
            return RouteContext(token_mask, False, *(generation.named or (None, None)), ids=input_ids,
                                generation=generation)
        named = None
        if reads_text:
            named = generation.named if follow is None else \
                generation.follow_sentence(input_ids, follow, self._edits(bank)[0], bank.memories.device)
        if not self.cfg.hold:
            generation.note_token(input_ids, self.sentences, bank.edit_targets, bank.n_memories)
        return RouteContext(token_mask, True, *(named or (None, None)), ids=input_ids, generation=generation)

    def route(self, a32: torch.Tensor, ctx: RouteContext, bank: MemoryBank, delta_out: DeltaOut) -> torch.Tensor:
        """(B,) memory index per example, NO_MEMORY for the main memory.

        Held (``hold_routing``): the prompt decides for every generated token.  Otherwise each
        generated token is routed on its own, except that a memory keeps answering while the
        text follows one of its edits' targets, and once it has answered it stays shut until
        the sentence ends: a reply can reach an edited fact ("The capital of Australia is")
        and move on after the answer instead of repeating it."""
        gen = ctx.generation if ctx.generation is not None else Generation(None, follows=False)
        if ctx.decoding and gen.held is not None:
            if self.cfg.hold:
                route = gen.held
                gen.routed(route)
            else:
                route = gen.step_route(lambda shut: self._decide(a32, ctx, bank, delta_out, shut),
                                       self.sentences, bank.edit_targets)
        else:
            route = self._decide(a32, ctx, bank, delta_out)
            gen.prompt_routed(route, self.sentences, bank.edit_targets, bank.n_memories)
        self.last_route = route
        return route

    def _decide(self, a32: torch.Tensor, ctx: RouteContext, bank: MemoryBank, delta_out: DeltaOut,
                shut: torch.Tensor | None = None) -> torch.Tensor:
        mask = ctx.mask_for(a32.shape[1])
        named = ctx.named if ctx.named is not None and ctx.named.shape[1] == a32.shape[0] else None
        possible = None
        if named is not None and self._selective(bank):
            # Thousands of edits: the subject gate first, and keys compared only for the
            # memories it leaves possible (text naming no edited subject costs no key at all).
            keyed = ctx.keyed.to(a32.device)
            possible = self._possible(named.to(a32.device), keyed, bank)
            if not bool(possible.any()):
                self.last_scores = torch.zeros(bank.n_memories, a32.shape[0], device=a32.device)
                return torch.full((a32.shape[0],), NO_MEMORY, dtype=torch.long, device=a32.device)
        open_, rank = self._key_gates(a32, mask, bank, possible)
        if named is not None:  # the subject and answer gates; the key gates only for edits without a subject
            named, keyed = self._edit_gates(named.to(a32.device), ctx.keyed.to(a32.device), a32, mask, bank)
            key_open = open_ if open_ is not None else torch.ones_like(named)
            open_ = named | (keyed[:, None] & key_open)
        if shut is not None:
            open_ = (open_ if open_ is not None else torch.ones_like(shut)) & ~shut
        scores = self._scores(a32.shape[0], mask, open_, bank, delta_out)
        self.last_scores = scores
        return choose_memory(scores, bank.thresholds, rank)

    def _selective(self, bank: MemoryBank) -> bool:
        """Whether gates are worth narrowing first (one host sync): many memories or many edits."""
        return bank.n_memories >= SELECTIVE_FROM or bank.answer_keys.shape[0] >= SELECTIVE_KEYS \
            or bank.edit_keys.shape[0] >= SELECTIVE_KEYS or bank.other_keys.shape[0] >= SELECTIVE_KEYS

    def _possible(self, named: torch.Tensor, keyed: torch.Tensor, bank: MemoryBank) -> torch.Tensor:
        """(K,) memories any row could be routed to: one of their edits' subjects is named, or
        one of their edits has no subject (the key gates decide those)."""
        _, _, owner = self._edits(bank)
        per_memory = torch.zeros(bank.n_memories, dtype=torch.bool, device=named.device)
        hit = (named.any(dim=1) | keyed) & (owner < bank.n_memories)
        per_memory[owner[hit]] = True
        return per_memory

    def _edit_gates(self, named: torch.Tensor, keyed: torch.Tensor, a32: torch.Tensor,
                    mask: torch.Tensor | None, bank: MemoryBank) -> tuple[torch.Tensor, torch.Tensor]:
        """Per edit (E, B) -> per memory (K, B): memories with an edit whose subject the text
        names and (answer gate) whose answer keys its answer position matches; (K,) memories
        with an edit without a subject.  An edit without answer keys passes the answer gate."""
        _, n_edits, owner = self._edits(bank)
        if self.cfg.answer_gate > 0 and bank.answer_keys.shape[0] and n_edits == named.shape[0]:
            last = F.normalize(project_out(last_token(a32, mask), bank.basis), dim=-1)
            best = self._answer_match(last, named, bank, n_edits)
            named = named & ((best >= self.cfg.answer_gate) | self._keyless(bank, n_edits)[:, None])
        per_memory = torch.zeros(bank.n_memories, named.shape[1], dtype=torch.int32, device=a32.device)
        keep = owner < bank.n_memories
        per_memory.index_add_(0, owner[keep], named[keep].to(torch.int32))
        keyed_k = torch.zeros(bank.n_memories, dtype=torch.bool, device=a32.device)
        keyed_k[owner[keep][keyed[keep]]] = True
        return per_memory > 0, keyed_k

    def _answer_match(self, last: torch.Tensor, named: torch.Tensor, bank: MemoryBank, n_edits: int) -> torch.Tensor:
        """(E, B) ``answer_match``, -1 where one of the edit's other keys is at least as close
        as its best answer key; with many keys, computed only for the edits a row names (the
        rest are shut by the subject gate whatever their keys say, and score -1)."""
        edits = named.any(dim=1).nonzero().flatten() if self._selective(bank) else None
        best = self._match(last, self._answer_keys(bank), bank.answer_key_edit, n_edits, edits)
        if bank.other_keys.shape[0]:
            other = self._match(last, self._unit("other", bank.other_keys, bank.basis), bank.other_key_edit,
                                n_edits, edits)
            best = torch.where(best > other, best, torch.full_like(best, -1.0))
        return best

    @staticmethod
    def _match(last: torch.Tensor, keys: torch.Tensor, key_edit: torch.Tensor, n_edits: int,
               edits: torch.Tensor | None) -> torch.Tensor:
        """(E, B) ``answer_match`` over all edits, or (``edits`` given) over those only."""
        if edits is None:
            return answer_match(last, keys, key_edit, n_edits)
        best = torch.full((n_edits, last.shape[0]), -1.0, device=last.device)
        if edits.numel():
            slot = torch.full((n_edits,), -1, dtype=torch.long, device=last.device)
            slot[edits] = torch.arange(edits.numel(), device=last.device)
            sel = slot[key_edit] >= 0
            best[edits] = answer_match(last, keys[sel], slot[key_edit[sel]], edits.numel())
        return best

    def _key_gates(self, a32: torch.Tensor, mask: torch.Tensor | None, bank: MemoryBank,
                   possible: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(K, B) memories the key and coverage gates leave open, and what ranks them (key
        coverage with several memories); (None, None) when the key gate is off.  ``possible``
        (K,): only these memories' keys are compared (the others come out shut, at -1)."""
        cfg = self.cfg
        if cfg.key_gate <= 0 or bank.edit_keys.shape[0] == 0:
            return None, None
        by_cover = bank.n_memories > 1
        keys, key_memory = self._keys(bank), bank.key_memory
        owner = self._owner(bank) if by_cover or cfg.coverage_gate > 0 else None
        if possible is not None:
            sel = possible[key_memory]
            keys, key_memory = keys[sel], key_memory[sel]
            owner = None if owner is None else (owner[0][sel], owner[1])
        sims, cover = key_match(project_out(a32, bank.basis), mask, keys, key_memory, bank.n_memories, owner)
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
        return self._unit("edit", bank.edit_keys, bank.basis)

    def _answer_keys(self, bank: MemoryBank) -> torch.Tensor:
        return self._unit("answer", bank.answer_keys, bank.basis)

    def _unit(self, name: str, keys: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """Keys as a gate reads them: projected like the activations, unit norm."""
        c = self._units.get(name)
        if c is None or c[0] is not keys or c[1] is not basis:
            c = self._units[name] = (keys, basis, F.normalize(project_out(keys.float(), basis), dim=-1))
        return c[2]

    def _edits(self, bank: MemoryBank) -> tuple[list[tuple[int, str | None]], int, torch.Tensor]:
        """The subject gate per edit: (edit, subject) pairs, how many, and each edit's memory
        (on the memories' device)."""
        c = self._per_edit
        subjects = bank.edit_subjects
        if c is None or c[0] is not subjects or c[1] != len(subjects) or c[3].device != bank.memories.device:
            c = self._per_edit = (subjects, len(subjects), [(e, s) for e, (_, s) in enumerate(subjects)],
                                  torch.tensor([k for k, _ in subjects], dtype=torch.long,
                                               device=bank.memories.device))
        return c[2], c[1], c[3]

    def _keyless(self, bank: MemoryBank, n_edits: int) -> torch.Tensor:
        """(E,) edits without answer keys (written before the gate): they pass it."""
        c = self._no_answer
        if c is None or c[0] is not bank.answer_key_edit or c[1] != n_edits:
            keyless = torch.ones(n_edits, dtype=torch.bool, device=bank.answer_key_edit.device)
            keyless[bank.answer_key_edit] = False
            c = self._no_answer = (bank.answer_key_edit, n_edits, keyless)
        return c[2]

    def _owner(self, bank: MemoryBank) -> tuple[torch.Tensor, int]:
        c = self._edit_owner
        if c is None or c[0] is not bank.key_edit:
            c = self._edit_owner = (bank.key_edit, edit_index(bank.key_edit))
        return c[1]
