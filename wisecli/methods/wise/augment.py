"""Text the model writes for itself: random prefixes and irrelevant prompts; and the text an
edit is trained or keyed on beside its prompt (near misses, rewordings, chat turns, other relations).

The prefixes and irrelevant prompts are generated once per model (seeded) and stored in the
manifest, so a user needs no data beyond the edits and a later run reuses exactly the same.
"""
from __future__ import annotations

import re
from importlib import resources
from typing import Callable

import torch
import torch.nn as nn

from wisecli.runtime.memory import SideMemoryLayer

PREFIX_SEEDS = ("The", "Therefore", "Because", "I", "You", "It", "In", "When", "This", "We")

# Neutral openings, half statements and half questions: the router must learn to
# stay quiet on questions too, since edit prompts are often questions.
NEGATIVE_SEEDS = (
    "The", "In", "A", "It is", "My", "There are", "One of the", "After the", "Many people",
    "Today", "According to", "The best way to", "I think", "Scientists", "The history of",
    "Question: What is", "Question: Who", "Question: Where is", "Question: When did",
    "What is the", "Who is the", "Where is the", "How many", "Which", "Why do",
    "The capital of", "The author of", "The president of", "The language spoken in",
    "The company", "The river", "The song", "The film", "The team", "She was born in",
    "He plays", "The city of", "The book", "The largest", "The first",
)


@torch.no_grad()
def _sample(model: nn.Module, tokenizer, seeds: list[str], max_new_tokens: int,
            seed: int) -> list[str]:
    device = next(model.parameters()).device
    enc = tokenizer(seeds, return_tensors="pt", padding=True).to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(**enc, do_sample=True, top_k=5, max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    # Some decoders drop the space that began the continuation: put it back.
    return [" ".join((s + (t if t[:1] in (" ", "") else " " + t)).split()) for s, t in zip(seeds, texts)]


def generate_prefixes(model: nn.Module, tokenizer, mem: SideMemoryLayer, n: int,
                      lengths: tuple[int, ...], seed: int) -> list[str]:
    """Short self-generated contexts; an edit trained under them holds after any context."""
    if n == 0:
        return []
    prefixes: list[str] = []
    with mem.main_only():
        for i, length in enumerate(lengths):
            count = n // len(lengths) + (1 if i < n % len(lengths) else 0)
            seeds = [PREFIX_SEEDS[j % len(PREFIX_SEEDS)] for j in range(count)]
            if count:
                prefixes += _sample(model, tokenizer, seeds, length, seed + i)
    return [p.replace("{", " ").replace("}", " ").strip() + "." for p in prefixes]


def generate_negatives(model: nn.Module, tokenizer, mem: SideMemoryLayer, n: int,
                       lengths: tuple[int, ...], seed: int) -> list[str]:
    seeds = [NEGATIVE_SEEDS[j % len(NEGATIVE_SEEDS)] for j in range(n)]
    out: list[str] = []
    with mem.main_only():
        for i, length in enumerate(lengths):
            chunk = seeds[i::len(lengths)]
            if chunk:
                out += _sample(model, tokenizer, chunk, length, seed + 101 + i)
    return out


def with_prefix(prefix: str, prompt: str) -> str:
    return f"{prefix} {prompt}" if prefix else prompt


def chat_turns(tokenizer, prompt: str) -> list[str]:
    """The edit as a chat turn, for tokenizers with a chat template: the prompt as the
    user's message, followed by the reply's start (the answer comes first), and by a reply
    that restates the prompt (the answer comes after it).  A deployed model is asked
    through its template; an edit trained only as a bare completion is not answered there.
    The user's message is the prompt itself, never a question: the questions a user asks
    are left for the evaluation to ask."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    head = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True, tokenize=False)
    return [head, head + prompt]


def _entities() -> list[str]:
    text = resources.files("wisecli.methods.wise").joinpath("data/entities.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


_STARTERS = {"The", "A", "An", "What", "Who", "Where", "When", "Which", "How", "Why", "In", "Is", "Was"}
_PROPER = re.compile(r"[A-Z][\w'’.-]*(?:\s+(?:of|the|de|da|del|van|von|la|le)?\s*[A-Z][\w'’.-]*)*")


def subject_of(prompt: str, subject: str | None) -> str | None:
    """The edit's subject: as given when it occurs in the prompt, else the longest proper-noun span."""
    if subject and subject in prompt:
        return subject
    spans = [m.group(0) for m in _PROPER.finditer(prompt)]
    spans = [s for s in spans if s.split()[0] not in _STARTERS or len(s.split()) > 1]
    spans = [" ".join(s.split()[1:]) if s.split()[0] in _STARTERS else s for s in spans]
    return max(spans, key=len) if spans else None


def neighbours(prompt: str, subject: str | None, n: int, seed: int,
               rank: Callable[[str, list[str]], list[int]] | None = None) -> list[str]:
    """Near-miss prompts: the edit's template about other subjects.

    Generic irrelevant text teaches the router nothing about "The capital of Canada
    is" when the edit is "The capital of Australia is": the shared template makes
    both score alike.  Training the router to stay quiet on the template with another
    subject makes it key on the subject, which is what locality needs.  Half the
    subjects are the ones ``rank`` finds most alike (hardest), half are random.
    """
    subj = subject_of(prompt, subject)
    if not subj or n == 0:
        return []
    pool = [e for e in _entities() if e.casefold() != subj.casefold()]
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(pool), generator=gen).tolist()
    picks: list[int] = []
    if rank is not None:
        picks = rank(subj, pool)[: (n + 1) // 2]
    picks += [i for i in order if i not in picks][: n - len(picks)]
    return [prompt.replace(subj, pool[i], 1) for i in picks]


# Other relations of a subject, as a completion and as the question a user asks: an edit's
# answer gate learns that these are not its own relation (``other_relations``).  None of them is
# one that ``wise eval`` asks (``app/asking.py``), so its same-subject figures test relations the
# gate never saw.
OTHER_RELATIONS = (
    ("The mother of {s} is", "Who is the mother of {s}?"),
    ("The spouse of {s} is", "Who is {s} married to?"),
    ("The population of {s} is", "What is the population of {s}?"),
    ("The currency of {s} is", "What currency does {s} use?"),
    ("{s} is a citizen of", "Which country is {s} a citizen of?"),
    ("The owner of {s} is", "Who owns {s}?"),
    ("{s} was educated at", "Where was {s} educated?"),
    ("The genre of {s} is", "What genre is {s}?"),
    ("{s} received the award", "Which award did {s} receive?"),
    ("The continent of {s} is", "On which continent is {s}?"),
    ("The instrument {s} plays is", "What instrument does {s} play?"),
    ("The parent company of {s} is", "What is the parent company of {s}?"),
)
_STOP = {"what", "which", "where", "when", "does", "that", "this", "with", "from", "name", "their", "there"}


def content_stems(text: str) -> set[str]:
    """Content words by their first five letters ("founded" and "founder" are one)."""
    words = re.findall(r"[a-z]+", text.casefold())
    return {w[:5] for w in words if len(w) >= 4 and w not in _STOP}


def other_relations(prompt: str, subject: str | None, n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (completion, question) pairs asking the edit's subject about relations that share
    no content word with its prompt, so that none asks the edited relation again."""
    subj = subject_of(prompt, subject)
    if not subj or n == 0:
        return []
    asked = content_stems(prompt.replace(subj, " "))
    fit = [(c, q) for c, q in OTHER_RELATIONS
           if not (content_stems(c.replace("{s}", " ")) | content_stems(q.replace("{s}", " "))) & asked]
    order = torch.randperm(len(fit), generator=torch.Generator().manual_seed(seed)).tolist()
    return [(fit[i][0].format(s=subj), fit[i][1].format(s=subj)) for i in order[:n]]


def reworded(prompt: str, subject: str | None, n: int, seed: int) -> list[str]:
    """``n`` copies of the prompt, each with one or two words left out (word dropout).

    Prefixes vary what comes before a prompt, never its own wording, so the memory can
    learn an edit through the exact template's tokens and miss the same question asked
    another way.  With words of the template missing, the only thing every copy shares
    is the subject (kept whole) and the final word (which the answer follows): the
    update must work through them.  A prompt with nothing to drop is repeated as is.
    """
    words = prompt.split()
    subj = subject_of(prompt, subject)
    keep = {len(words) - 1}
    if subj:
        start = prompt.find(subj)
        pos = 0
        for i, w in enumerate(words):
            pos = prompt.find(w, pos)
            if pos < start + len(subj) and pos + len(w) > start:
                keep.add(i)
            pos += len(w)
    free = [i for i in range(len(words)) if i not in keep]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if not free:
            out.append(prompt)
            continue
        k = 1 if len(free) < 4 else 1 + int(torch.randint(2, (1,), generator=gen))
        drop = {free[i] for i in torch.randperm(len(free), generator=gen)[:k].tolist()}
        out.append(" ".join(w for i, w in enumerate(words) if i not in drop))
    return out


def embedding_ranker(model: nn.Module, tokenizer) -> Callable[[str, list[str]], list[int]]:
    """Rank candidate subjects by cosine similarity of their mean input embeddings."""
    table = model.get_input_embeddings().weight

    def embed(text: str) -> torch.Tensor:
        ids = tokenizer(" " + text, add_special_tokens=False)["input_ids"] or [0]
        return table[torch.tensor(ids, device=table.device)].float().mean(0)

    cache: dict[str, torch.Tensor] = {}

    def rank(subject: str, pool: list[str]) -> list[int]:
        for p in pool:
            if p not in cache:
                cache[p] = embed(p)
        keys = torch.stack([cache[p] for p in pool])
        sims = torch.nn.functional.cosine_similarity(keys, embed(subject)[None], dim=-1)
        return sims.argsort(descending=True).tolist()
    return rank
