"""How an edit holds where a patched model is used, beyond completing its own prompt.

* chat: the edit asked as a question through the tokenizer's chat template, as the only
  turn, under a system prompt, after an earlier turn and sampled; and the subject's other
  relations asked in chat, reply unchanged (``chat_use``; what is asked: ``asking``);
* fluency: 40 greedy tokens after each edit prompt and rephrase.  *Repetition*: an edit whose
  continuation names its target 3 or more times; *generation entropy*: ROME/MEMIT's weighted
  bigram/trigram entropy; *leakage*: another edit's target in a continuation where the
  unedited model does not write it;
* same-subject locality: completions about the edited subject with other relations
  (``asking.same_subject_probes``), scored like locality against the unedited model's own
  answers.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence


from wisecli.app.asking import names, same_subject_probes
from wisecli.app.chat_use import has_chat, measure_chat
from wisecli.app.chat_use import work as chat_work
from wisecli.app.edits import EditRecord

CONTINUATION_TOKENS = 40
REPEATED = 3  # target mentions in one continuation that count as repetition
def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME/MEMIT's generation entropy: weighted mean over n of the n-gram frequency entropy."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    parts = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        parts.append(w * -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0)
    return sum(parts) / len(parts)


@dataclass
class Use:
    """One edit's use measurements (None: not measured)."""

    chat_question: str | None = None
    chat_reply: str | None = None
    chat_correct: bool | None = None
    chat_system: bool | None = None   # named under a system prompt
    chat_turn: bool | None = None     # after an earlier turn
    chat_sampled: bool | None = None  # sampled at temperature 0.7
    same_subject_chat: float | None = None
    continuation: str = ""
    repeats: int = 0
    leaked: tuple[str, ...] = ()
    entropy: float | None = None
    same_subject: float | None = None


def fluency(edits: list[EditRecord], edited: list[list[str]], base: list[list[str]]) -> list[Use]:
    """Per edit, from its continuations (prompt first, then rephrases) on the patched and the
    unedited model: repetition count, leaked targets, entropy of the prompt's continuation."""
    targets = [e.target_new for e in edits]
    out = []
    for i, (e, mine, theirs) in enumerate(zip(edits, edited, base)):
        repeats = max((names(t, e.target_new) for t in mine), default=0)
        leaked = sorted({o for j, o in enumerate(targets) if j != i and names(e.target_new, o) == 0
                         and any(names(t, o) > names(b, o) for t, b in zip(mine, theirs))})
        out.append(Use(continuation=mine[0] if mine else "", repeats=repeats, leaked=tuple(leaked),
                       entropy=ngram_entropy(mine[0]) if mine else None))
    return out


def work(edits: list[EditRecord], tokenizer, routed: bool, conditions: bool = True) -> int:
    """Progress ticks ``measure`` will make."""
    n_cont = sum(1 + len(e.rephrase) for e in edits) * (2 if routed else 1)
    probes = [a for e in edits for _, a in same_subject_probes(e)]
    n_subject = (len(probes) + sum(a is None for a in probes)) if routed else len(probes)
    return n_cont + (chat_work(edits, routed, conditions) if has_chat(tokenizer) else 0) + n_subject


def measure(model, tok, mem, edits: list[EditRecord], *, batch_size: int, generate: Callable,
            locality: Callable, tick: Callable[[int], None],
            conditions: bool = True) -> tuple[list[Use], dict[str, float | None]]:
    """Every use measurement, per edit and in total (``conditions``: chat asked every way, see
    ``chat_use``).  ``generate`` / ``locality`` are the
    evaluation's own greedy generation and locality scoring (``metrics``)."""
    groups = [[e.prompt, *e.rephrase] for e in edits]
    flat = [p for g in groups for p in g]
    limits = [CONTINUATION_TOKENS] * len(flat)
    edited = generate(model, tok, flat, limits, batch_size, tick)
    if mem is not None:
        with mem.main_only():
            base = generate(model, tok, flat, limits, batch_size, tick)
    else:
        base = edited
    uses = fluency(edits, _regroup(edited, groups), _regroup(base, groups))
    if has_chat(tok):
        for use, c in zip(uses, measure_chat(model, tok, mem, edits, batch_size, tick, conditions)):
            use.chat_question, use.chat_reply, use.chat_correct = c.question, c.reply, c.correct["plain"]
            use.chat_system, use.chat_turn, use.chat_sampled = (c.correct.get(k) for k in ("system", "turn", "sampled"))
            use.same_subject_chat = c.same_subject
    probes = [(i, p, a) for i, e in enumerate(edits) for p, a in same_subject_probes(e)]
    scores = locality(model, tok, mem, [(p, a) for _, p, a in probes], batch_size, tick)
    for i, use in enumerate(uses):
        mine = [s for (j, _, _), s in zip(probes, scores) if j == i and s is not None]
        use.same_subject = sum(mine) / len(mine) if mine else None
    return uses, _totals(uses, [s for s in scores if s is not None], has_chat(tok))


def _regroup(flat: list[str], groups: list[list[str]]) -> list[list[str]]:
    out, at = [], 0
    for g in groups:
        out.append(flat[at:at + len(g)])
        at += len(g)
    return out


def _totals(uses: list[Use], subject_scores: list[float], chat: bool) -> dict[str, float | None]:
    n = len(uses)
    entropies = [u.entropy for u in uses if u.entropy is not None]
    def share(xs: list[bool | None]) -> float | None:
        asked = [x for x in xs if x is not None]
        return sum(asked) / len(asked) if chat and asked else None

    same_chat = [u.same_subject_chat for u in uses if u.same_subject_chat is not None]
    return {"chat_accuracy": share([u.chat_correct for u in uses]),
            "chat_accuracy_system": share([u.chat_system for u in uses]),
            "chat_accuracy_turn": share([u.chat_turn for u in uses]),
            "chat_accuracy_sampled": share([u.chat_sampled for u in uses]),
            "repetition": sum(u.repeats >= REPEATED for u in uses) / n if n else None,
            "leakage": sum(bool(u.leaked) for u in uses) / n if n else None,
            "generation_entropy": sum(entropies) / len(entropies) if entropies else None,
            "same_subject_locality": sum(subject_scores) / len(subject_scores) if subject_scores else None,
            "same_subject_chat": sum(same_chat) / len(same_chat) if chat and same_chat else None}
