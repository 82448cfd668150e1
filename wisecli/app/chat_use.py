"""An edit asked in chat the ways a deployment asks it, and the subject's other relations.

Chat accuracy is the edit's question answered with the new target (and not the old answer
when the record gives it): as the only turn (greedy), under a system prompt, after an
earlier turn, and sampled at ``TEMPERATURE`` (seeded, so a rerun gives the same figure).
Same-subject chat is the other relations of the edited subject asked as questions: the
greedy reply (``CHAT_TOKENS``) must read exactly as the unedited model's; a memory that
stays shut leaves it so, one that opens almost never does.
"""
from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from wisecli.app.asking import CONDITIONS, conversation, names, question_for, same_subject_questions
from wisecli.app.edits import EditRecord
from wisecli.methods.wise.augment import subject_of

CHAT_TOKENS = 32
TEMPERATURE = 0.7
SEED = 0


def has_chat(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


@dataclass
class ChatUse:
    """One edit's chat measurements (None: not measured)."""

    question: str
    reply: str
    correct: dict[str, bool]           # condition ("plain", "system", "turn", "sampled") -> named the target
    same_subject: float | None = None  # share of other-relation questions answered as before


@torch.no_grad()
def chat_replies(model, tok, conversations: list[list[dict[str, str]]], batch_size: int,
                 tokens: int = CHAT_TOKENS, sample: bool = False) -> list[str]:
    """Replies to ``conversations`` through the chat template: greedy, or sampled at
    ``TEMPERATURE`` under a fixed seed that leaves the caller's random state as it was."""
    out: list[str] = []
    device = next(model.parameters()).device
    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else []) if sample else nullcontext()
    with rng:
        if sample:
            torch.manual_seed(SEED)
        for start in range(0, len(conversations), batch_size):
            texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                     for c in conversations[start:start + batch_size]]
            enc = tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False,
                      return_token_type_ids=False).to(device)
            how = dict(do_sample=True, temperature=TEMPERATURE, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
            ids = model.generate(**enc, **how, max_new_tokens=tokens, pad_token_id=tok.pad_token_id)
            out += [t.strip() for t in tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    return out


def chat_correct(reply: str, record: EditRecord) -> bool:
    """The reply names the new target and not the old answer.  The old answer is looked for
    outside the subject's own name: "The Apple A5 was created by Google" names no old
    "Apple" (CounterFact's subjects often contain their old answer)."""
    old = record.ground_truth
    if names(reply, record.target_new) == 0:
        return False
    if not old or names(old, record.target_new) > 0:
        return True
    subject = subject_of(record.prompt, record.subject)
    rest = re.sub(re.escape(subject), " ", reply, flags=re.IGNORECASE) if subject else reply
    return names(rest, old) == 0


def work(edits: list[EditRecord], routed: bool, conditions: bool = True) -> int:
    """Replies ``measure_chat`` will generate (its progress ticks)."""
    if not conditions:
        return len(edits)
    n_same = sum(len(same_subject_questions(e)) for e in edits)
    return len(edits) * (len(CONDITIONS) + 1) + n_same * (2 if routed else 1)


def measure_chat(model, tok, mem, edits: list[EditRecord], batch_size: int,
                 tick: Callable[[int], None], conditions: bool = True) -> list[ChatUse]:
    """Each edit's chat accuracy under every condition, and its same-subject chat; without
    ``conditions`` only the greedy single turn (the quick look ``wise edit`` takes)."""
    questions = [question_for(e) for e in edits]
    correct: list[dict[str, bool]] = [{} for _ in edits]
    plain: list[str] = []
    asks = [(c, False) for c in CONDITIONS] + [("plain", True)] if conditions else [("plain", False)]
    for condition, sample in asks:
        replies = chat_replies(model, tok, [conversation(q, condition) for q in questions], batch_size,
                               sample=sample)
        plain = replies if condition == "plain" and not sample else plain
        for c, e, reply in zip(correct, edits, replies):
            c["sampled" if sample else condition] = chat_correct(reply, e)
        tick(len(edits))
    if not conditions:
        return [ChatUse(q, reply, c) for q, reply, c in zip(questions, plain, correct)]
    asked = [(i, [{"role": "user", "content": q}]) for i, e in enumerate(edits) for q in same_subject_questions(e)]
    edited = chat_replies(model, tok, [c for _, c in asked], batch_size)
    tick(len(asked))
    if mem is not None:
        with mem.main_only():
            base = chat_replies(model, tok, [c for _, c in asked], batch_size)
        tick(len(asked))
    else:
        base = edited
    out = []
    for i, (q, reply, c) in enumerate(zip(questions, plain, correct)):
        same = [a == b for (j, _), a, b in zip(asked, edited, base) if j == i]
        out.append(ChatUse(q, reply, c, sum(same) / len(same) if same else None))
    return out
