"""The measurements of use (wisecli/usage.py): questions, repetition, leakage, entropy,
same-subject probes -- as functions, and through evaluate on a model with a chat template."""
from __future__ import annotations

import pytest

from wisecli.app.edits import EditRecord
from wisecli.app.usage import (fluency, names, ngram_entropy, question_for, same_subject_probes)


@pytest.mark.parametrize("prompt,question", [
    ("The capital of Australia is", "What is the capital of Australia?"),
    ("The first person to walk on the Moon was", "Who was the first person to walk on the Moon?"),
    ("The Eiffel Tower is located in the city of", "In which city is the Eiffel Tower located?"),
    ("The play Hamlet was written by", "By whom was the play Hamlet written?"),
    ("Tokyo is the capital of", "Of which country is Tokyo the capital?"),
    ("What is the capital of France?", "What is the capital of France?"),
    ("Apple was founded by Steve Jobs and", "Fill in the blank: Apple was founded by Steve Jobs and ___"),
    ("What is the twin city of Lyon? It is", "What is the twin city of Lyon?"),
    ("Ferrari F40, developed by", "By whom was Ferrari F40 developed?"),
    ("Anaal Nathrakh, that was created in", "Where was Anaal Nathrakh created?"),
    ("Laurent Cars was employed in", "Where was Laurent Cars employed?"),
    ("Inner Circle railway line can be found in", "Where can Inner Circle railway line be found?"),
    ("Maso da San Friano passed away at", "Where did Maso da San Friano die?"),
])
def test_questions_are_derived_from_the_prompt(prompt, question):
    assert question_for(EditRecord(id="x", prompt=prompt, target_new="t")) == question
    given = EditRecord(id="x", prompt=prompt, target_new="t", question="Where is it?")
    assert question_for(given) == "Where is it?"


def test_names_counts_whole_words_in_any_case():
    assert names("Perth. Perth is perth's capital, not Perthshire", "Perth") == 3
    assert names("Tim Cook, tim  cook Tim Cook", "Tim Cook") == 3 and names("", "x") == 0


def test_entropy_is_low_for_repetition_and_higher_for_prose():
    assert ngram_entropy("Perth Perth Perth Perth Perth Perth") < 0.5
    assert ngram_entropy("Perth is the capital of Western Australia and lies on the Swan River") > 3


def test_fluency_counts_repetition_and_leakage_against_the_unedited_model():
    edits = [EditRecord(id="a", prompt="p1", target_new="Perth"), EditRecord(id="b", prompt="p2", target_new="Canada"),
             EditRecord(id="c", prompt="p3", target_new="Tim Cook")]
    edited = [["Perth. Perth is Perth Perth"], ["Canada is big, and he is Tim Cook"], ["Tim Cook runs it"]]
    base = [["Canberra."], ["Canada is big"], ["someone runs it, in Canada"]]
    uses = fluency(edits, edited, base)
    assert [u.repeats for u in uses] == [4, 1, 1]
    assert [u.leaked for u in uses] == [(), ("Tim Cook",), ()]  # c's Canada is the unedited model's own


def test_same_subject_probes_come_from_the_record_or_the_subject():
    own = EditRecord(id="x", prompt="p", target_new="t", same_subject=(("Its rank is", "genus"),))
    assert same_subject_probes(own) == [("Its rank is", "genus")]
    made = same_subject_probes(EditRecord(id="y", prompt="The capital of Australia is", target_new="Perth"))
    assert len(made) == 5 and all("Australia" in p and a is None for p, a in made)
    assert not any("capital" in p for p, _ in made)  # never the edited relation again
    founder = same_subject_probes(EditRecord(id="f", prompt="Apple was founded by", target_new="X", subject="Apple"))
    assert len(founder) == 5 and not any("found" in p.lower() for p, _ in founder)
    assert same_subject_probes(EditRecord(id="z", prompt="the chemical symbol for gold is", target_new="Ag")) == []
