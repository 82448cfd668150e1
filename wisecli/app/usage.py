"""How an edit holds where a patched model is used, beyond completing its own prompt.

* chat accuracy: the edit asked as a question through the tokenizer's chat template; the
  greedy reply must name the new target (and not the old answer when the record gives it).
  The question is the record's own (``question``; a prompt that already is one), else one
  derived from the prompt by a few sentence shapes, else "Fill in the blank: <prompt> ___";
* fluency: 40 greedy tokens after each edit prompt and rephrase.  *Repetition*: an edit whose
  continuation names its target 3 or more times; *generation entropy*: ROME/MEMIT's weighted
  bigram/trigram entropy; *leakage*: another edit's target in a continuation where the
  unedited model does not write it;
* same-subject locality: prompts about the edited subject with other relations (the
  record's ``same_subject``, KnowEdit's Relation_Specificity; else ``PROBES_PER_EDIT`` of
  ``SUBJECT_PROBES`` that share no content word with the edit's prompt, so none asks the
  edited relation again), scored like locality against the unedited model's own answers.
"""
from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from wisecli.app.edits import EditRecord
from wisecli.methods.wise.augment import subject_of

CONTINUATION_TOKENS = 40
CHAT_TOKENS = 32
REPEATED = 3  # target mentions in one continuation that count as repetition
# Other relations a user asks about a subject, as completions (the unedited model's own
# answer is the reference, so a relation that does not fit the subject still tests it).
SUBJECT_PROBES = ("{s} is located in", "The founder of {s} is", "{s} was born in",
                  "The official language of {s} is", "{s} is a member of", "{s} was created by",
                  "The capital of {s} is", "{s} works as a", "The country of origin of {s} is",
                  "{s} was founded in the year", "The headquarters of {s} are in", "{s} is best known for",
                  "The name of the father of {s} is", "{s} died in", "{s} plays the position of",
                  "The religion of {s} is")
PROBES_PER_EDIT = 5
_STOP = {"what", "which", "where", "when", "does", "that", "this", "with", "from", "name", "their", "there"}
_PERSON = re.compile(r"\b(person|founder|author|creator|inventor|president|director|writer|painter|ceo|king|queen)\b",
                     re.IGNORECASE)
_SHAPES: tuple[tuple[re.Pattern, Callable[[re.Match], str]], ...] = (
    (re.compile(r"^(?P<x>.+?) (?P<v>is|was|are|were) located in the (?P<n>\w+) of$", re.I),
     lambda m: f"In which {m['n']} {m['v']} {_lower_article(m['x'])} located?"),
    (re.compile(r"^(?P<x>.+?) (?P<v>is|was) the capital of$", re.I),
     lambda m: f"Of which country {m['v']} {m['x']} the capital?"),
    (re.compile(r"^(?P<x>.+?) (?P<v>is|was|are|were) (?P<p>\w+) by$", re.I),
     lambda m: f"By whom {m['v']} {_lower_article(m['x'])} {m['p']}?"),
    (re.compile(r"^(?P<x>(?:the|a|an) .+?) (?P<v>is|was|are|were)$", re.I),
     lambda m: f"{'Who' if _PERSON.search(m['x']) else 'What'} {m['v']} {_lower_article(m['x'])}?"),
    # "Ferrari F40, developed by", "Anaal Nathrakh, that was created in", "X was employed in"
    (re.compile(r"^(?P<x>.+?),? (?:that |which |who )?(?:(?P<v>is|was|are|were) )?"
                r"(?P<p>\w+ed|\w+en|born|made|built) (?P<by>by|in|at)$", re.I),
     lambda m: f"{'By whom' if m['by'].lower() == 'by' else 'Where'} {(m['v'] or 'was').lower()} "
               f"{_lower_article(m['x'])} {m['p']}?"),
    (re.compile(r"^(?P<x>.+?) can be found in$", re.I), lambda m: f"Where can {_lower_article(m['x'])} be found?"),
    (re.compile(r"^(?P<x>.+?) (?:passed away|died) (?:in|at)$", re.I), lambda m: f"Where did {_lower_article(m['x'])} die?"),
)
# A question followed by the start of its answer: "What is the twin city of Lyon? It is".
_ASKED = re.compile(r"^(?:.*[.!]\s+)?(?P<q>[^.!?]+\?)\s+\S[^?]*$")


def _lower_article(text: str) -> str:
    head, _, rest = text.partition(" ")
    return f"{head.lower()} {rest}" if head in ("The", "A", "An") else text


def question_for(record: EditRecord) -> str:
    """The question a chat user would ask about the edit."""
    if record.question:
        return record.question
    prompt = " ".join(record.prompt.split())
    if prompt.endswith("?"):
        return prompt
    asked = _ASKED.match(prompt)
    if asked:
        return asked["q"].strip()
    for shape, ask in _SHAPES:
        m = shape.match(prompt)
        if m:
            return ask(m)
    return f"Fill in the blank: {prompt} ___"


def names(text: str, target: str) -> int:
    """How many times ``text`` names ``target`` (whole words, any case)."""
    t = " ".join(target.casefold().split())
    return len(re.findall(rf"(?<!\w){re.escape(t)}(?!\w)", " ".join(text.casefold().split()))) if t else 0


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME/MEMIT's generation entropy: weighted mean over n of the n-gram frequency entropy."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    parts = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        parts.append(w * -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0)
    return sum(parts) / len(parts)


def same_subject_probes(record: EditRecord) -> list[tuple[str, str | None]]:
    """(prompt, answer or None for the unedited model's own) about the subject, other relations."""
    if record.same_subject:
        return list(record.same_subject)
    subject = subject_of(record.prompt, record.subject)
    if not subject:
        return []
    asked = _stems(record.prompt.replace(subject, " "))
    other = [p for p in SUBJECT_PROBES if not _stems(p.replace("{s}", " ")) & asked]
    start = int(hashlib.sha256(record.prompt.encode()).hexdigest()[:8], 16) % len(other) if other else 0
    return [(p.format(s=subject), None) for p in (other[start:] + other[:start])[:PROBES_PER_EDIT]]


def _stems(text: str) -> set[str]:
    """Content words by their first five letters ("founded" and "founder" are one)."""
    words = re.findall(r"[a-z]+", text.casefold())
    return {w[:5] for w in words if len(w) >= 4 and w not in _STOP}


@dataclass
class Use:
    """One edit's use measurements (None: not measured)."""

    chat_question: str | None = None
    chat_reply: str | None = None
    chat_correct: bool | None = None
    continuation: str = ""
    repeats: int = 0
    leaked: tuple[str, ...] = ()
    entropy: float | None = None
    same_subject: float | None = None


def has_chat(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


@torch.no_grad()
def chat_replies(model, tok, questions: list[str], batch_size: int, tokens: int = CHAT_TOKENS) -> list[str]:
    """Greedy replies to ``questions`` asked through the chat template, one turn each."""
    out: list[str] = []
    device = next(model.parameters()).device
    for start in range(0, len(questions), batch_size):
        texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                         tokenize=False) for q in questions[start:start + batch_size]]
        enc = tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False,
                  return_token_type_ids=False).to(device)
        ids = model.generate(**enc, do_sample=False, max_new_tokens=tokens, pad_token_id=tok.pad_token_id)
        out += [t.strip() for t in tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    return out


def chat_correct(reply: str, record: EditRecord) -> bool:
    old = record.ground_truth
    return names(reply, record.target_new) > 0 and not (old and names(reply, old) > 0
                                                        and names(old, record.target_new) == 0)


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


def work(edits: list[EditRecord], tokenizer, routed: bool) -> int:
    """Progress ticks ``measure`` will make."""
    n_cont = sum(1 + len(e.rephrase) for e in edits) * (2 if routed else 1)
    probes = [a for e in edits for _, a in same_subject_probes(e)]
    n_subject = (len(probes) + sum(a is None for a in probes)) if routed else len(probes)
    return n_cont + (len(edits) if has_chat(tokenizer) else 0) + n_subject


def measure(model, tok, mem, edits: list[EditRecord], *, batch_size: int, generate: Callable,
            locality: Callable, tick: Callable[[int], None]) -> tuple[list[Use], dict[str, float | None]]:
    """Every use measurement, per edit and in total.  ``generate`` / ``locality`` are the
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
        questions = [question_for(e) for e in edits]
        for use, e, q, reply in zip(uses, edits, questions, chat_replies(model, tok, questions, batch_size)):
            use.chat_question, use.chat_reply, use.chat_correct = q, reply, chat_correct(reply, e)
        tick(len(edits))
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
    return {"chat_accuracy": sum(bool(u.chat_correct) for u in uses) / n if chat and n else None,
            "repetition": sum(u.repeats >= REPEATED for u in uses) / n if n else None,
            "leakage": sum(bool(u.leaked) for u in uses) / n if n else None,
            "generation_entropy": sum(entropies) / len(entropies) if entropies else None,
            "same_subject_locality": sum(subject_scores) / len(subject_scores) if subject_scores else None}
