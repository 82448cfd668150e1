"""The subject gate: a memory answers a prompt only if the prompt names one of its edits' subjects.

Why text and not activations: the key gate compares a prompt's activations with an
edit's stored ones (cosine >= key_gate), and at a late layer a word's activation
depends on its context.  A rephrase that moves the subject ("Australia's capital city
is" for "The capital of Australia is") matches none of the edit's keys, while a prompt in
the edit's template about another subject ("The capital of Canada is") matches the
template's.  The subject's name is what a rephrase keeps and a near miss changes, so the
gate reads it from the prompt's text.  Measured on trained states in docs/experiments.md, "The subject
gate".  Edits without a subject found in their prompt keep the key gate.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Callable, Sequence

import torch


def normalise(text: str) -> str:
    """Case and spacing do not change which subject a prompt names."""
    return " ".join(text.casefold().split())


def subject_open(texts: Sequence[str], subjects: Sequence[tuple[int, str | None]],
                 n_owners: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which owners (memories, or edits) each prompt names a subject of, and which owners
    hold an edit with none.

    texts: the prompts (B); subjects: (owner, subject or None) per edit.  Returns ``named``
    (K, B) bool and ``keyed`` (K,) bool: owner k holds an edit without a subject, which
    only the key gate can open.  Each prompt is checked only against the subjects whose
    first word it contains, so thousands of edits cost a dictionary lookup per word.
    """
    named = torch.zeros(n_owners, len(texts), dtype=torch.bool)
    keyed = torch.zeros(n_owners, dtype=torch.bool)
    by_word, always, unnamed = _name_index(tuple(subjects), n_owners)
    if unnamed:
        keyed[list(unnamed)] = True
    for b, text in enumerate(normalise(t) for t in texts):
        candidates = set(always)
        for word in set(_WORD.findall(text)):
            candidates.update(by_word.get(word, ()))
        for owners, pattern in candidates:
            if pattern.search(text) is not None:
                named[list(owners), b] = True
    return named, keyed


_WORD = re.compile(r"\w+")
_Name = tuple[tuple[int, ...], re.Pattern]  # a subject's owners and its whole-word pattern


@lru_cache(maxsize=8)
def _name_index(subjects: tuple[tuple[int, str | None], ...], n_owners: int
                ) -> tuple[dict[str, tuple[_Name, ...]], tuple[_Name, ...], frozenset[int]]:
    """Names by their first word, names without a word to index them by, owners without a subject."""
    owners: dict[str, set[int]] = {}
    unnamed = set()
    for k, subject in subjects:
        if not 0 <= k < n_owners:
            continue
        if subject and normalise(subject):
            owners.setdefault(normalise(subject), set()).add(k)
        else:
            unnamed.add(k)
    by_word: dict[str, list[_Name]] = {}
    always: list[_Name] = []
    for name, ks in owners.items():
        entry = (tuple(sorted(ks)), _pattern(frozenset([name])))
        first = _WORD.match(name)
        (by_word.setdefault(first.group(0), []) if first else always).append(entry)
    return {w: tuple(v) for w, v in by_word.items()}, tuple(always), frozenset(unnamed)


@lru_cache(maxsize=1 << 16)
def _pattern(names: frozenset[str]) -> re.Pattern:
    """Whole words only: "Apple" is not named by "pineapple", "Australia" is by "Australia's"."""
    return re.compile("|".join(rf"(?<!\w){re.escape(n)}(?!\w)" for n in sorted(names)))


def prompt_texts(input_ids: torch.Tensor, token_mask: torch.Tensor | None,
                 decode: Callable[[list[int]], str]) -> list[str]:
    """Each row's text over the tokens the router reads (the prompt, never padding)."""
    ids = input_ids.tolist()
    if token_mask is None:
        return [decode(row) for row in ids]
    mask = token_mask[:, -input_ids.shape[1]:].tolist()
    return [decode([t for t, m in zip(row, keep) if m]) for row, keep in zip(ids, mask)]


BOUNDARY_CHARS = (".", "!", "?", "\n", "Ċ", "<0x0A>")  # "Ċ" / "<0x0A>": a newline in byte-level vocabularies


class SentenceSubjects:
    """The subject gate for generated text, on token ids: which memories' subjects the current
    sentence names.  A reply that moves on to another subject ("Perth. The capital of New
    Zealand is") no longer opens the memory, and nothing is decoded or synced per token."""

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        self._boundary: torch.Tensor | None = None
        self._compiled: tuple[tuple, dict[int, tuple[torch.Tensor, torch.Tensor]]] | None = None
        self._targets: tuple[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self._table: tuple[tuple, dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] | None = None

    def boundary(self, device: torch.device) -> torch.Tensor:
        """(V,) bool: tokens that end a sentence (built once, from the vocabulary's strings)."""
        if self._boundary is None or self._boundary.device != device:
            vocab = self._tok.get_vocab()
            mask = torch.zeros(max(len(self._tok), max(vocab.values()) + 1), dtype=torch.bool)
            mask[[i for s, i in vocab.items() if any(c in s for c in BOUNDARY_CHARS)]] = True
            self._boundary = mask.to(device)
        return self._boundary

    def sequences(self, subjects: Sequence[tuple[int, str | None]], device: torch.device
                  ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """{length: (token sequences (S, length), their owner (S,))} of every subject, in the
        spellings a text may use (leading space or not, capitalised or not); a sequence
        appears once per owner (two edits may share a subject)."""
        key = (tuple(subjects), str(device))
        if self._compiled is None or self._compiled[0] != key:
            groups: dict[int, dict[tuple[tuple[int, ...], int], None]] = {}
            for k, subject in subjects:
                for text in _spellings(subject):
                    ids = tuple(self._tok(text, add_special_tokens=False)["input_ids"])
                    if ids:
                        groups.setdefault(len(ids), {})[(ids, k)] = None
            self._compiled = (key, {n: (torch.tensor([i for i, _ in g], device=device),
                                        torch.tensor([k for _, k in g], device=device))
                                    for n, g in groups.items()})
        return self._compiled[1]

    def in_sentence(self, ids: torch.Tensor, mask: torch.Tensor | None, subjects: Sequence[tuple[int, str | None]],
                    n_memories: int) -> torch.Tensor:
        """(K, B): owners (memories, or edits) whose subject occurs after each row's last sentence boundary."""
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask[:, -ids.shape[1]:].bool()
        boundary = self.boundary(ids.device)
        ends = boundary[ids.clamp(0, boundary.numel() - 1)] & real
        positions = torch.arange(ids.shape[1], device=ids.device)
        last = torch.where(ends, positions, torch.full_like(positions, -1)).amax(dim=1)  # (B,)
        counts = torch.zeros(n_memories, ids.shape[0], dtype=torch.int32, device=ids.device)
        for n, (seqs, memory) in self.sequences(subjects, ids.device).items():
            if ids.shape[1] < n:
                continue
            windows = ids.unfold(1, n, 1)  # (B, W, n): windows starting at 0..T-n
            hit = (windows[:, :, None, :] == seqs[None, None]).all(-1)  # (B, W, S)
            after = torch.arange(windows.shape[1], device=ids.device)[None, :] > last[:, None]
            hit &= (after & real.unfold(1, n, 1).all(-1))[..., None]
            counts.index_add_(0, memory, hit.any(1).T.to(torch.int32))
        return counts > 0

    def step(self, recent: torch.Tensor, new: torch.Tensor, named: torch.Tensor,
             subjects: Sequence[tuple[int, str | None]]) -> tuple[torch.Tensor, torch.Tensor]:
        """After one generated token per row (new: (B, 1)): a sentence boundary clears what the
        sentence named; a subject ending at this token is named.  recent: (B, m) last tokens."""
        boundary = self.boundary(new.device)
        recent = torch.cat([recent[:, 1:], new], dim=1)
        named = named & ~boundary[new[:, 0].clamp(0, boundary.numel() - 1)][None, :]
        counts = torch.cat([named.to(torch.int32), named.new_zeros(1, named.shape[1], dtype=torch.int32)])
        cols = torch.arange(named.shape[1], device=new.device)
        for n, (hashes, seqs, owners) in self.table(subjects, new.device).items():
            if recent.shape[1] < n:
                continue
            window = recent[:, -n:]
            at = torch.searchsorted(hashes, _hash(window)).clamp_max(hashes.numel() - 1)  # (B,)
            hit = (seqs[at] == window).all(-1)  # the hash found it and the tokens agree
            owner = torch.where(hit[:, None] & (owners[at] >= 0), owners[at], named.shape[0])  # (B, M)
            counts.index_put_((owner.flatten(), cols[:, None].expand_as(owner).flatten()),
                              torch.ones(owner.numel(), dtype=torch.int32, device=new.device), accumulate=True)
        return recent, counts[:-1] > 0

    def table(self, subjects: Sequence[tuple[int, str | None]], device: torch.device
              ) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``sequences`` as a lookup table per length: each distinct sequence's hash (sorted),
        the sequence, and its owners ((U, M), -1 filled).  A generated token then costs a
        binary search, not a comparison with every edit's subject (10,000 edits: 40,000
        spellings, which cost more per token than the side memory did)."""
        key = (tuple(subjects), str(device))
        if self._table is None or self._table[0] != key:
            out = {}
            for n, (seqs, owner) in self.sequences(subjects, device).items():
                groups: dict[tuple[int, ...], list[int]] = {}
                for row, k in zip(seqs.tolist(), owner.tolist()):
                    groups.setdefault(tuple(row), []).append(k)
                uniq = torch.tensor(list(groups), device=device).reshape(-1, n)
                width = max(len(v) for v in groups.values())
                owners = torch.tensor([v + [-1] * (width - len(v)) for v in groups.values()], device=device)
                order = torch.argsort(_hash(uniq))
                out[n] = (_hash(uniq)[order], uniq[order], owners[order])
            self._table = (key, out)
        return self._table[1]

    def targets(self, targets: Sequence[tuple[int, str]], device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every edit's new target as token ids, as it follows a word or starts a line:
        (T (E', L) padded with -1, lengths (E',), memory (E',))."""
        key = (tuple(targets), str(device))
        cached = self._targets
        if cached is None or cached[0] != key:
            rows = [(k, tuple(self._tok(text, add_special_tokens=False)["input_ids"]))
                    for k, target in targets for text in {f" {target.strip()}", target.strip()}]
            rows = [(k, ids) for k, ids in rows if ids] or [(0, (-2,))]
            width = max(len(ids) for _, ids in rows)
            table = torch.full((len(rows), width), -1, dtype=torch.long)
            for i, (_, ids) in enumerate(rows):
                table[i, :len(ids)] = torch.tensor(ids)
            cached = self._targets = (key, (table.to(device), torch.tensor([len(i) for _, i in rows], device=device),
                                            torch.tensor([k for k, _ in rows], device=device)))
        return cached[1]

    def span(self, subjects: Sequence[tuple[int, str | None]], device: torch.device) -> int:
        """How many recent tokens ``step`` needs: the longest subject's."""
        return max(self.sequences(subjects, device), default=1)


def _hash(seqs: torch.Tensor) -> torch.Tensor:
    """(..., n) token ids -> (...) int64 polynomial hash (wrapping).  A lookup checks the tokens
    it found, so a collision never names a wrong subject; two of the table's own subjects
    sharing a hash (odds of about S^2 / 2^64) would hide one of them."""
    powers = torch.full((seqs.shape[-1],), 1_000_003, dtype=torch.int64, device=seqs.device)
    powers = torch.cumprod(powers, 0)
    return (seqs.to(torch.int64) * powers).sum(-1)


def _spellings(subject: str | None) -> set[str]:
    if not subject or not subject.strip():
        return set()
    s = " ".join(subject.split())
    cased = {s, s.lower(), s[:1].upper() + s[1:]}
    return cased | {f" {c}" for c in cased}
