"""Edit metrics in the field's convention (EasyEdit-compatible), so numbers compare with papers.

* reliability / generalization / portability: teacher-forced token accuracy of the answer after
  the prompt (its rephrases, its portability questions), on the patched model, with the router
  deciding from the prompt's tokens only — as it would when the answer is not yet written;
* locality: share of the answer tokens whose argmax is unchanged from the unedited model;
* generated accuracy: greedy generation from the prompt starts with the target (the stricter
  "WILD" protocol), reported beside the teacher-forced numbers;
* perplexity: exp of the mean token NLL of the target after the prompt, averaged over edits
  (the hallucination benchmark's metric, where targets are whole passages).

Every number is per row: batches are left-padded with explicit position ids, so a probe scores
the same whatever else shares its batch (``batch_size=1`` gives the same report).
"""
from __future__ import annotations

import string
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

from wisecli.batching import encode_answer, encode_pairs
from wisecli.app import usage
from wisecli.app.edits import EditRecord
from wisecli.app.usage import Use
from wisecli.runtime.maths import target_accuracy, target_nll
from wisecli.methods.base import EditedLayer
from wisecli.runtime.router import NO_MEMORY
from wisecli.methods.wise.train import forward_logits

LOCALITY_TOKENS = 8  # length of the unedited model's own answer where a record gives none
Tick = Callable[[int], None]


@dataclass
class EditResult:
    id: str
    prompt: str
    target: str
    reliability: float              # teacher-forced token accuracy of target_new after prompt
    generalization: float | None    # mean over rephrases (None if none)
    locality: float | None          # None if no locality_prompt
    generated: float | None         # 1.0 if greedy output starts with the target; None if not generated
    portability: float | None
    generated_text: str
    routed: bool | None             # the prompt went through a side memory; None without a memory
    perplexity: float | None = None  # exp(mean NLL) of target_new after the prompt
    use: Use | None = None           # chat, fluency, same-subject (usage.py); None if not measured


@dataclass
class EvalReport:
    n_edits: int
    reliability: float | None
    generalization: float | None
    locality: float | None
    generated_accuracy: float | None
    portability: float | None
    edits: list[EditResult]
    seconds: float
    perplexity: float | None = None
    # Where the model is used (usage.py): None where not measured (or no chat template).
    chat_accuracy: float | None = None
    chat_accuracy_system: float | None = None   # under a system prompt
    chat_accuracy_turn: float | None = None     # after an earlier turn
    chat_accuracy_sampled: float | None = None  # sampled at temperature 0.7
    repetition: float | None = None
    leakage: float | None = None
    generation_entropy: float | None = None
    same_subject_locality: float | None = None
    same_subject_chat: float | None = None      # other relations asked in chat, reply unchanged

    def to_dict(self) -> dict[str, Any]:
        return {"n_edits": self.n_edits, "reliability": self.reliability,
                "generalization": self.generalization, "locality": self.locality,
                "generated_accuracy": self.generated_accuracy, "portability": self.portability,
                "perplexity": self.perplexity, "chat_accuracy": self.chat_accuracy,
                "chat_accuracy_system": self.chat_accuracy_system, "chat_accuracy_turn": self.chat_accuracy_turn,
                "chat_accuracy_sampled": self.chat_accuracy_sampled,
                "repetition": self.repetition, "leakage": self.leakage,
                "generation_entropy": self.generation_entropy, "same_subject_locality": self.same_subject_locality,
                "same_subject_chat": self.same_subject_chat,
                "seconds": self.seconds, "edits": [asdict(e) for e in self.edits]}


# ---- small helpers ------------------------------------------------------------------

def _mean(xs: Sequence[float | None]) -> float | None:
    """Mean of the values that exist: a probe without data must not count as a failure."""
    vals = [float(x) for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), max(1, size)):
        yield items[i:i + max(1, size)]


def _by_length(pairs: list[tuple[str, str]]) -> list[int]:
    """Indices of ``pairs`` shortest first: rows of like length share a batch, so left padding
    costs little; every score is per row, so the order changes no figure."""
    return sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))


def _in_order(order: list[int], values: list) -> list:
    out: list = [None] * len(order)
    for i, v in zip(order, values):
        out[i] = v
    return out


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def normalise(text: str) -> str:
    """Casefold, collapse whitespace, drop leading punctuation: "  ,Paris" matches "paris"."""
    return " ".join(text.casefold().split()).lstrip(string.punctuation + " ")


def starts_with_target(generated: str, target: str) -> bool:
    return normalise(generated).startswith(normalise(target))


def _shares(logits: torch.Tensor, labels: torch.Tensor) -> list[float | None]:
    """Per-row token accuracy; None for a row with no scored token (nothing to judge)."""
    share, _ = target_accuracy(logits, labels)
    n = (labels[:, 1:] != -100).sum(-1)
    return [float(s) if int(k) else None for s, k in zip(share.tolist(), n.tolist())]


def _perplexities(logits: torch.Tensor, labels: torch.Tensor) -> list[float | None]:
    n = (labels[:, 1:] != -100).sum(-1)
    return [float(torch.exp(x)) if int(k) else None
            for x, k in zip(target_nll(logits, labels), n.tolist())]


# ---- the three kinds of measurement ----------------------------------------------------

@torch.no_grad()
def _teacher_forced(model, tok, mem: EditedLayer | None, pairs: list[tuple[str, str]],
                    batch_size: int, tick: Tick) -> list[tuple[float | None, int | None, float | None]]:
    """(token accuracy, route, perplexity) per (query, answer), routing on the query only.

    The route is read from the layer after each forward (None when nothing was routed: no
    memories).
    """
    out: list[tuple[float | None, int | None, float | None]] = []
    order = _by_length(pairs)
    for chunk in _chunks([pairs[i] for i in order], batch_size):
        batch = encode_pairs(tok, [q for q, _ in chunk], [a for _, a in chunk]).to(_device(model))
        route: list[int | None] = [None] * len(chunk)
        if mem is None:
            logits = forward_logits(model, batch)
        else:
            with mem.routing_on(batch.query_mask):
                logits = forward_logits(model, batch)
            last = mem.last_route
            route = [NO_MEMORY] * len(chunk) if last is None else [int(r) for r in last.tolist()]
        labels = batch.kept_labels()
        out += list(zip(_shares(logits, labels), route, _perplexities(logits, labels)))
        tick(len(chunk))
    return _in_order(order, out)


@torch.no_grad()
def _agreement(model, tok, mem: EditedLayer, pairs: list[tuple[str, str]],
               batch_size: int, tick: Tick) -> list[float | None]:
    """Share of answer tokens whose argmax on the patched model equals the unedited model's.

    The unedited argmax becomes the label, so the comparison is ``target_accuracy`` itself.
    """
    out: list[float | None] = []
    order = _by_length(pairs)
    for chunk in _chunks([pairs[i] for i in order], batch_size):
        batch = encode_pairs(tok, [q for q, _ in chunk], [a for _, a in chunk]).to(_device(model))
        with mem.routing_on(batch.query_mask):
            edited = forward_logits(model, batch)
            with mem.main_only():
                base = forward_logits(model, batch)
        labels = batch.kept_labels()
        ref = labels.clone()
        ref[:, 1:] = torch.where(labels[:, 1:] != -100, base[:, :-1].argmax(-1), -100)
        out += _shares(edited, ref)
        tick(len(chunk))
    return _in_order(order, out)


@torch.no_grad()
def _generate(model, tok, prompts: list[str], limits: list[int], batch_size: int,
              tick: Tick) -> list[str]:
    """Greedy continuations, new tokens only, each cut at its own limit.

    A batch generates up to its longest limit and each row is cut afterwards: greedy decoding
    is per row, so the text is what ``batch_size=1`` would give.
    """
    texts: list[str] = []
    for start in range(0, len(prompts), max(1, batch_size)):
        chunk = [p.rstrip() for p in prompts[start:start + max(1, batch_size)]]
        lim = limits[start:start + len(chunk)]
        # left padding: each prompt must end where generation starts
        enc = tok(chunk, return_tensors="pt", padding=True, padding_side="left",
                  return_token_type_ids=False).to(_device(model))
        seqs = model.generate(**enc, do_sample=False, max_new_tokens=max(lim),
                              pad_token_id=tok.pad_token_id)
        new = seqs[:, enc["input_ids"].shape[1]:]
        texts += [tok.decode(row[:n], skip_special_tokens=True).strip()
                  for row, n in zip(new, lim)]
        tick(len(chunk))
    return texts


# ---- the report ------------------------------------------------------------------

def _locality(model, tok, mem: EditedLayer | None, items: list[tuple[str, str | None]],
              batch_size: int, tick: Tick) -> list[float | None]:
    """Locality per (prompt, answer-or-None); an unedited model is local by definition."""
    if mem is None:
        return [1.0] * len(items)
    missing = [i for i, (_, a) in enumerate(items) if a is None]
    answers = [a for _, a in items]
    if missing:
        with mem.main_only():
            own = _generate(model, tok, [items[i][0] for i in missing],
                            [LOCALITY_TOKENS] * len(missing), batch_size, tick)
        for i, text in zip(missing, own):
            answers[i] = text
    # An empty own answer (the model stopped at once) leaves nothing to compare: no data.
    keep = [i for i, a in enumerate(answers) if a and a.strip()]
    if len(keep) < len(items):
        tick(len(items) - len(keep))  # so progress still ends at its total
    scores = _agreement(model, tok, mem, [(items[i][0], answers[i]) for i in keep], batch_size, tick)
    out: list[float | None] = [None] * len(items)
    for i, s in zip(keep, scores):
        out[i] = s
    return out


def evaluate(model, tokenizer, mem: EditedLayer | None, edits: list[EditRecord], *,
             extra_locality: list[tuple[str, str | None]] | None = None,
             batch_size: int = 16, generate: bool = True, max_new_tokens: int | None = None,
             use: bool = True, chat_conditions: bool = True,
             progress: Callable[[int, int], None] | None = None) -> EvalReport:
    """Score ``edits`` on the model as it is now (after all edits: the lifelong setting).

    ``extra_locality`` pairs count in the total locality only; ``use`` adds the measurements
    of use (chat, fluency, same-subject: ``usage.py``; needs ``generate``), with chat asked
    every way unless not ``chat_conditions`` (then once, greedy: a quicker look).  The model
    is put in eval mode for the run (dropout would make the numbers random) and restored afterwards.
    """
    use = use and generate
    t0 = time.perf_counter()
    probes = [(i, kind, q, a) for i, e in enumerate(edits) for kind, q, a in
              [("rel", e.prompt, e.target_new)] + [("gen", r, e.target_new) for r in e.rephrase]
              + [("port", q, a) for q, a in e.portability]]
    loc_items = [(e.locality_prompt, e.locality_ground_truth) for e in edits if e.locality_prompt]
    loc_items += list(extra_locality or [])
    n_own = sum(a is None for _, a in loc_items) if mem is not None else 0
    total = len(probes) + (len(loc_items) + n_own if mem is not None else 0) \
        + (len(edits) if generate else 0) + (usage.work(edits, tokenizer, mem is not None, chat_conditions) if use else 0)
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    was_training = model.training
    model.eval()
    try:
        scored = _teacher_forced(model, tokenizer, mem, [(q, a) for _, _, q, a in probes],
                                 batch_size, tick)
        loc = _locality(model, tokenizer, mem, loc_items, batch_size, tick)
        texts = _generate(model, tokenizer, [e.prompt for e in edits],
                          [max_new_tokens or len(encode_answer(tokenizer, e.target_new)) + 3
                           for e in edits], batch_size, tick) if generate else None
        uses, totals = usage.measure(model, tokenizer, mem, edits, batch_size=batch_size, generate=_generate,
                                     locality=_locality, tick=tick, conditions=chat_conditions) if use else ([None] * len(edits), {})
    finally:
        model.train(was_training)
    results = _results(edits, probes, scored, loc, texts, mem is not None)
    for r, u in zip(results, uses):
        r.use = u
    extra = loc[sum(1 for e in edits if e.locality_prompt):]
    return EvalReport(**totals,
        n_edits=len(edits),
        reliability=_mean([r.reliability for r in results]),
        generalization=_mean([r.generalization for r in results]),
        locality=_mean([r.locality for r in results] + extra),
        generated_accuracy=_mean([r.generated for r in results]),
        portability=_mean([r.portability for r in results]),
        perplexity=_mean([r.perplexity for r in results]),
        edits=results, seconds=time.perf_counter() - t0)


def _results(edits: list[EditRecord], probes: list[tuple[int, str, str, str]],
             scored: list[tuple[float | None, int | None, float | None]], loc: list[float | None],
             texts: list[str] | None, has_memory: bool) -> list[EditResult]:
    """Fold the flat probe scores back into one result per edit."""
    by: dict[tuple[int, str], list[float | None]] = {}
    route: dict[int, int | None] = {}
    ppl: dict[int, float | None] = {}
    for (i, kind, _, _), (share, r, p) in zip(probes, scored):
        by.setdefault((i, kind), []).append(share)
        if kind == "rel":
            route[i], ppl[i] = r, p
    loc_iter = iter(loc)
    results = []
    for i, e in enumerate(edits):
        text = texts[i] if texts is not None else ""
        r = route.get(i)
        results.append(EditResult(
            id=e.id, prompt=e.prompt, target=e.target_new,
            reliability=_mean(by.get((i, "rel"), [])) or 0.0,
            generalization=_mean(by.get((i, "gen"), [])),
            locality=next(loc_iter) if e.locality_prompt else None,
            generated=(float(starts_with_target(text, e.target_new)) if texts is not None else None),
            portability=_mean(by.get((i, "port"), [])),
            generated_text=text,
            routed=(r is not None and r != NO_MEMORY) if has_memory else None,
            perplexity=ppl.get(i)))
    return results


CHAT_FIGURES = ("chat_accuracy", "same_subject_chat")  # n/a without a chat template


def failed_gates(report: EvalReport, minimum: dict[str, float | None], maximum: dict[str, float | None]) -> list[dict]:
    """The CI gates a report fails: a figure below its minimum or above its maximum.  A figure
    not measured fails its gate, except the chat figures without a chat template (n/a)."""
    failed = []
    for name, bound in minimum.items():
        value = getattr(report, name)
        if bound is not None and (value is None and name not in CHAT_FIGURES or value is not None and value < bound):
            failed.append({"metric": name, "value": value, "min": bound})
    for name, bound in maximum.items():
        value = getattr(report, name)
        if bound is not None and (value is None or value > bound):
            failed.append({"metric": name, "value": value, "max": bound})
    return failed
