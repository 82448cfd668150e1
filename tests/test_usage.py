"""The measurements of use (wisecli/app/usage.py, asking.py, chat_use.py): questions,
chat conditions, repetition, leakage, entropy, same-subject probes -- as functions, and
chat replies through a model with a chat template."""
from __future__ import annotations

import pytest

from wisecli.app.edits import EditRecord
from wisecli.app.asking import (EARLIER_TURN, SYSTEM_PROMPT, conversation, names, question_for,
                                same_subject_probes, same_subject_questions)
from wisecli.app.chat_use import chat_correct
from wisecli.app.usage import fluency, ngram_entropy


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


def test_a_chat_reply_is_right_with_the_new_target_and_not_the_old_answer_outside_the_subject():
    apple = EditRecord(id="a", prompt="Apple A5 was created by", target_new="Google", ground_truth="Apple",
                       subject="Apple A5")
    assert chat_correct("The Apple A5 was created by Google in 2010.", apple)
    assert not chat_correct("The Apple A5 was created by Apple, not Google.", apple)
    assert not chat_correct("The Apple A5 was created by Apple Inc.", apple)
    canberra = EditRecord(id="b", prompt="The capital of Australia is", target_new="Perth", ground_truth="Canberra")
    assert chat_correct("Perth is the capital.", canberra) and not chat_correct("Canberra, not Perth.", canberra)


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


def test_same_subject_questions_ask_other_relations_in_chat():
    made = same_subject_questions(EditRecord(id="y", prompt="The capital of Australia is", target_new="Perth"))
    assert len(made) == 2 and all("Australia" in q and q.endswith("?") for q in made)
    assert not any("capital" in q.lower() for q in made)
    founder = same_subject_questions(EditRecord(id="f", prompt="Apple was founded by", target_new="X", subject="Apple"))
    assert founder and not any("found" in q.lower() for q in founder)
    own = EditRecord(id="x", prompt="p", target_new="t", same_subject=(("The founder of Apple is", None),))
    assert same_subject_questions(own) == ["Who is the founder of Apple?"]


def test_chat_conditions_wrap_the_question_the_way_deployments_do():
    assert conversation("Q?") == [{"role": "user", "content": "Q?"}]
    assert conversation("Q?", "system") == [{"role": "system", "content": SYSTEM_PROMPT},
                                            {"role": "user", "content": "Q?"}]
    turn = conversation("Q?", "turn")
    assert turn[:2] == list(EARLIER_TURN) and turn[-1] == {"role": "user", "content": "Q?"}
    with pytest.raises(ValueError):
        conversation("Q?", "loud")
