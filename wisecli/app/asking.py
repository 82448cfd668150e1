"""What a user asks about an edit and its subject, as text: the measurements of use ask it.

* the edit as a chat question: the record's own (``question``; a prompt that already is
  one), else one derived from the prompt by a few sentence shapes, else "Fill in the blank:
  <prompt> ___";
* the ways a deployment wraps that question (``CONDITIONS``): as the only turn, under the
  deployment's own system prompt, after an earlier turn about something else;
* other relations of the edited subject, as completions (``same_subject_probes``) and as
  chat questions (``same_subject_questions``): the record's own (``same_subject``,
  KnowEdit's Relation_Specificity) first, else templates that share no content word with
  the edit's prompt, so none asks the edited relation again.
"""
from __future__ import annotations

import hashlib
import re
from typing import Callable

from wisecli.app.edits import EditRecord
from wisecli.methods.wise.augment import content_stems, subject_of

# Other relations a user asks about a subject, as completions (the unedited model's own
# answer is the reference, so a relation that does not fit the subject still tests it).
SUBJECT_PROBES = ("{s} is located in", "The founder of {s} is", "{s} was born in",
                  "The official language of {s} is", "{s} is a member of", "{s} was created by",
                  "The capital of {s} is", "{s} works as a", "The country of origin of {s} is",
                  "{s} was founded in the year", "The headquarters of {s} are in", "{s} is best known for",
                  "The name of the father of {s} is", "{s} died in", "{s} plays the position of",
                  "The religion of {s} is")
PROBES_PER_EDIT = 5
# The same relations asked as a chat user would; the unedited model's reply is the reference.
SUBJECT_QUESTIONS = ("Where is {s} located?", "Who founded {s}?", "Where was {s} born?",
                     "What is the official language of {s}?", "Which organisation is {s} a member of?",
                     "Who created {s}?", "What is the capital of {s}?", "What does {s} do for a living?",
                     "What is the country of origin of {s}?", "In which year was {s} founded?",
                     "Where are the headquarters of {s}?", "What is {s} best known for?",
                     "Who is the father of {s}?", "Where did {s} die?", "Which position does {s} play?",
                     "What religion is {s}?")
QUESTIONS_PER_EDIT = 2
# A deployment's own system prompt, and an earlier exchange about something else: an edit
# must hold under both, not only as the conversation's first and only turn.
SYSTEM_PROMPT = ("You are Juniper, the assistant of a reference-desk service. Answer the user's "
                 "questions accurately, in one or two sentences.")
EARLIER_TURN = ({"role": "user", "content": "Can you suggest a name for a small bakery?"},
                {"role": "assistant", "content": 'How about "The Daily Crumb"? It is short and easy to remember.'})
CONDITIONS = ("plain", "system", "turn")


def conversation(question: str, condition: str = "plain") -> list[dict[str, str]]:
    """The messages that ask ``question`` under ``condition`` (one of ``CONDITIONS``)."""
    before: list[dict[str, str]] = []
    if condition == "system":
        before = [{"role": "system", "content": SYSTEM_PROMPT}]
    elif condition == "turn":
        before = [dict(m) for m in EARLIER_TURN]
    elif condition != "plain":
        raise ValueError(f"unknown chat condition {condition!r}")
    return before + [{"role": "user", "content": question}]


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
    return record.question or as_question(record.prompt)


def as_question(prompt: str) -> str:
    """A completion prompt turned into the question it stands for."""
    prompt = " ".join(prompt.split())
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


def same_subject_probes(record: EditRecord) -> list[tuple[str, str | None]]:
    """(prompt, answer or None for the unedited model's own) about the subject, other relations."""
    if record.same_subject:
        return list(record.same_subject)
    return [(p, None) for p in _other_relations(record, SUBJECT_PROBES, PROBES_PER_EDIT)]


def same_subject_questions(record: EditRecord) -> list[str]:
    """Chat questions about the subject with other relations (the record's completions, when
    it gives them, are asked as they are)."""
    if record.same_subject:
        return [as_question(p) for p, _ in record.same_subject][:QUESTIONS_PER_EDIT]
    return _other_relations(record, SUBJECT_QUESTIONS, QUESTIONS_PER_EDIT)


def _other_relations(record: EditRecord, templates: tuple[str, ...], n: int) -> list[str]:
    """``n`` of ``templates`` about the edit's subject that share no content word with its
    prompt, starting at a place fixed by a hash of the prompt (each edit gets its own mix)."""
    subject = subject_of(record.prompt, record.subject)
    if not subject:
        return []
    asked = content_stems(record.prompt.replace(subject, " "))
    other = [p for p in templates if not content_stems(p.replace("{s}", " ")) & asked]
    start = int(hashlib.sha256(record.prompt.encode()).hexdigest()[:8], 16) % len(other) if other else 0
    return [p.format(s=subject) for p in (other[start:] + other[:start])[:n]]
