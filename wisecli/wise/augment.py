"""Text the model writes for itself: random prefixes, irrelevant prompts and rewrites.

Both are generated once per model (seeded) and stored in the manifest, so a
user needs no data beyond the edits and a later run reuses exactly the same.
"""
from __future__ import annotations

import copy
import inspect
import re
from importlib import resources
from typing import Any, Callable

import torch
import torch.nn as nn

from .memory import SideMemoryLayer, main_memory_only

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
    with main_memory_only(mem):
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
    with main_memory_only(mem):
        for i, length in enumerate(lengths):
            chunk = seeds[i::len(lengths)]
            if chunk:
                out += _sample(model, tokenizer, chunk, length, seed + 101 + i)
    return out


def with_prefix(prefix: str, prompt: str) -> str:
    return f"{prefix} {prompt}" if prefix else prompt


def _entities() -> list[str]:
    text = resources.files("wisecli").joinpath("data/entities.txt").read_text(encoding="utf-8")
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


# Rewrites the model continues (augment.paraphrased).  Invented subjects, so no dataset's
# facts leak into an edit; questions and statements, as edits come in both forms.
PARAPHRASE_SHOTS = (
    ("In which city was Tomas Velarde born?", "What city was Tomas Velarde born in?"),
    ("Which company manufactures the Orvel X9?", "The Orvel X9 is made by which company?"),
    ("The official language of Kestria is", "Kestria's official language is"),
    ("What country is Lake Mirren located in?", "Lake Mirren is in which country?"),
    ("Who directed the film Silent Harbour?", "Silent Harbour was directed by whom?"),
    ("The Grand Lune Hotel was designed by", "The architect of the Grand Lune Hotel is"),
)
_STOP = {"a", "an", "the", "of", "in", "on", "at", "to", "for", "by", "from", "with", "and", "or",
         "is", "are", "was", "were", "be", "been", "did", "does", "do", "has", "have", "had",
         "what", "which", "who", "whom", "whose", "where", "when", "how", "that", "this", "it",
         "its", "as", "into", "name", "s"}
_WORD = re.compile(r"[^\W_]+")


def _stems(text: str) -> set[str]:
    """Content words cut to five letters: "manufacturer" and "manufactured" count as one."""
    return {w[:5] for w in (m.group(0).casefold() for m in _WORD.finditer(text)) if w not in _STOP}


def faithful(candidate: str, prompt: str, subject: str) -> bool:
    """Whether a sampled rewrite can stand in for the prompt as a training row.

    A small model's rewrites often ask something else about the subject ("Who is the
    Volvo B12M?"), and training the edit's answer on those would teach it for other
    relations.  Kept: the subject verbatim, at least half the relation's content words,
    no name the prompt lacks, the same form (question or statement), a new wording.
    """
    if subject not in candidate or not candidate.strip(" ?.").strip():
        return False
    if candidate.casefold().strip(" ?.") == prompt.casefold().strip(" ?."):
        return False
    if prompt.rstrip().endswith("?") != candidate.endswith("?") or candidate.endswith((".", "!")):
        return False
    if len(candidate.split()) > 2 * len(prompt.split()) + 2:
        return False
    known = {w.strip("'’\"(),") for w in prompt.split()}
    rest = candidate.replace(subject, " ").split()
    if any(w[:1].isupper() and w.strip("'’\"(),?") not in known for w in rest[1:]):
        return False
    relation = _stems(prompt.replace(subject, " "))
    return len(relation & _stems(candidate.replace(subject, " "))) * 2 >= len(relation)


class Paraphraser:
    """Rewrites of edit prompts that the unedited model writes itself.

    Word dropout (``reworded``) only removes words; ZsRE's and users' rephrasings reorder
    them ("What company made X?" / "X's manufacturer was who?"), which moves the subject's
    context and so its activations.  The model continues a few-shot list of rewrites
    (``PARAPHRASE_SHOTS``); each sample must pass ``faithful``.  The few-shot text is the
    same for every edit, so it runs once and each edit costs only its own line and the
    sampled tokens (with ``generate`` the shots were 90 % of the time on gemma3's CPU run).
    """

    INSTRUCTION = "Rewrite each line in other words, keeping every name.\n"

    def __init__(self, model: nn.Module, tokenizer, mem: SideMemoryLayer) -> None:
        self.model, self.tok, self.mem = model, tokenizer, mem
        self._shots: tuple[torch.Tensor, Any] | None = None

    @torch.no_grad()
    def _context(self) -> Any:
        if self._shots is None:
            ids = self.tok(self.full_text(None), return_tensors="pt")["input_ids"].to(_device(self.model))
            with main_memory_only(self.mem):
                out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            self._shots = (ids, getattr(out, _cache_name(self.model)))
        return copy.deepcopy(self._shots[1])

    @torch.no_grad()
    def line_logits(self, prompt: str) -> tuple[torch.Tensor, Any]:
        """(1, vocab) next-token logits after the shots and the prompt's line, and the KV cache."""
        line = self.tok(f"Line: {prompt}\nRewritten:", add_special_tokens=False, return_tensors="pt")
        with main_memory_only(self.mem):
            cache = self._context()
            out = self.model(input_ids=line["input_ids"].to(_device(self.model)), use_cache=True,
                             logits_to_keep=1, **{_cache_name(self.model): cache})
        return out.logits[:, -1].float(), cache

    def full_text(self, prompt: str | None) -> str:
        """The text ``line_logits`` continues, in one piece (None: the shots alone)."""
        shots = self.INSTRUCTION + "".join(f"Line: {a}\nRewritten: {b}\n" for a, b in PARAPHRASE_SHOTS)
        return shots if prompt is None else shots + f"Line: {prompt}\nRewritten:"

    @torch.no_grad()
    def __call__(self, prompt: str, subject: str | None, n: int, seed: int) -> list[str]:
        """Up to ``n`` faithful rewrites; two samples are drawn per rewrite wanted."""
        subj = subject_of(prompt, subject)
        if n == 0 or not subj:
            return []
        device = _device(self.model)
        steps = 2 * len(self.tok(prompt, add_special_tokens=False)["input_ids"]) + 4
        samples = 2 * n
        gen = torch.Generator(device=device).manual_seed(seed)
        with main_memory_only(self.mem):
            logits, cache = self.line_logits(prompt)
            cache.batch_repeat_interleave(samples)
            logits = logits.expand(samples, -1)
            tokens: list[torch.Tensor] = []
            done = torch.zeros(samples, dtype=torch.bool, device=device)
            for _ in range(steps):
                top = (logits / 0.8).topk(20, dim=-1)
                pick = torch.multinomial(top.values.softmax(-1), 1, generator=gen)
                nxt = top.indices.gather(-1, pick)  # (samples, 1)
                tokens.append(nxt)
                done |= torch.tensor(["\n" in self.tok.decode(t) for t in nxt.flatten().tolist()], device=device)
                done |= nxt.flatten() == (self.tok.eos_token_id if self.tok.eos_token_id is not None else -1)
                if bool(done.all()):
                    break
                logits = self.model(input_ids=nxt, use_cache=True, logits_to_keep=1,
                                    **{_cache_name(self.model): cache}).logits[:, -1].float()
        kept: list[str] = []
        for row in torch.cat(tokens, dim=1).tolist():
            text = self.tok.decode(row, skip_special_tokens=True)
            cand = " ".join(text.split("\n")[0].split()).strip("\"")
            if cand not in kept and faithful(cand, prompt, subj):
                kept.append(cand)
        return kept[:n]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _cache_name(model: nn.Module) -> str:
    """transformers 5 calls the KV cache ``cache`` (argument and output); 4.x ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


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
