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
                 n_memories: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which memories each prompt names a subject of, and which memories hold edits with none.

    texts: the prompts (B); subjects: (memory, subject or None) per edit.  Returns
    ``named`` (K, B) bool and ``keyed`` (K,) bool: memory k holds an edit without a
    subject, which only the key gate can open.
    """
    named = torch.zeros(n_memories, len(texts), dtype=torch.bool)
    keyed = torch.zeros(n_memories, dtype=torch.bool)
    by_memory: dict[int, set[str]] = {}
    for k, subject in subjects:
        if not 0 <= k < n_memories:
            continue
        if subject and normalise(subject):
            by_memory.setdefault(k, set()).add(normalise(subject))
        else:
            keyed[k] = True
    norm = [normalise(t) for t in texts]
    for k, names in by_memory.items():
        pattern = _pattern(frozenset(names))
        for b, text in enumerate(norm):
            named[k, b] = pattern.search(text) is not None
    return named, keyed


@lru_cache(maxsize=1024)
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
