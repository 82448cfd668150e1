"""The subject gate's text side: which memories a prompt names a subject of."""
from __future__ import annotations

import torch

from wisecli.runtime.subjects import prompt_texts, subject_open


def test_a_subject_is_named_as_a_whole_word_in_any_case():
    texts = ["Australia's capital city is", "the capital of AUSTRALIA is", "Austria is in", "pineapple pie"]
    named, keyed = subject_open(texts, [(0, "Australia"), (1, "apple")], 2)
    assert named.tolist() == [[True, True, False, False], [False, False, False, False]]
    assert keyed.tolist() == [False, False]


def test_a_memory_holding_an_edit_without_subject_is_left_to_the_keys():
    named, keyed = subject_open(["The capital of Peru is"], [(0, "Peru"), (1, None), (1, "  ")], 3)
    assert named[:, 0].tolist() == [True, False, False]
    assert keyed.tolist() == [False, True, False]


def test_edits_sharing_a_subject_are_each_named():
    """Per edit (owner = edit): two edits of one subject are both named by a prompt naming it,
    also when the text only reaches them through a word that starts another subject."""
    subjects = [(0, "Apple"), (1, "Apple"), (2, "Apple Park"), (3, "Peru")]
    named, _ = subject_open(["The CEO of Apple is", "Where is Apple Park?", "Peru"], subjects, 4)
    assert named.tolist() == [[True, True, False], [True, True, False], [False, True, False],
                              [False, False, True]]


def test_spacing_inside_a_subject_does_not_matter():
    named, _ = subject_open(["Where is  Mount   Everest?"], [(0, "Mount Everest")], 1)
    assert named.tolist() == [[True]]


def test_prompt_texts_read_only_the_masked_tokens():
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])  # padding, then an answer token left out
    texts = prompt_texts(ids, mask, lambda row: " ".join(map(str, row)))
    assert texts == ["5 6", "7 8 9"]


def test_the_current_sentence_names_a_subject_and_a_boundary_clears_it():
    """SentenceSubjects follows token ids: a subject after the last '.' is named; a new '.'
    clears it; a subject spelled across tokens is found when its last token arrives."""
    import torch

    from conftest import make_tokenizer
    from wisecli.runtime.subjects import SentenceSubjects
    tok = make_tokenizer()
    follow = SentenceSubjects(tok)
    subjects = [(0, "france"), (1, "big tower"), (1, None)]
    ids = lambda text: torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])  # noqa: E731
    named = follow.in_sentence(ids("the capital of france is"), None, subjects, 2)
    assert named[:, 0].tolist() == [True, False]
    named = follow.in_sentence(ids("the capital of france is . the queen lives in"), None, subjects, 2)
    assert named[:, 0].tolist() == [False, False]  # france is in an earlier sentence
    span = follow.span(subjects, torch.device("cpu"))
    assert span == 2
    recent = ids("lives in")[:, -span:]
    for word, want in (("the", [False, False]), ("big", [False, False]), ("tower", [False, True]),
                       ("is", [False, True]), (".", [False, False])):
        recent, named = follow.step(recent, ids(word), named, subjects)
        assert named[:, 0].tolist() == want, word


def test_a_generated_token_finds_every_edit_whose_subject_it_ends_among_thousands():
    """The per-token lookup (a hash table per subject length) names exactly the owners a
    comparison with every subject's tokens names: 3,000 edits, subjects shared by several
    edits, one and two words long, rows of a batch ending different subjects or none."""
    import random

    from conftest import WORDS, make_tokenizer
    from wisecli.runtime.subjects import SentenceSubjects
    tok = make_tokenizer()
    rng = random.Random(0)
    words = [w for w in WORDS if w.isalpha()]
    subjects = [(e // 10, " ".join(rng.sample(words, rng.choice((1, 2))))) for e in range(3000)]
    n_owners = 300
    follow = SentenceSubjects(tok)
    span = follow.span(subjects, torch.device("cpu"))
    for trial in range(20):
        rows = [" ".join(rng.sample(words, span + 1)) for _ in range(6)]
        ids = torch.tensor([tok(r, add_special_tokens=False)["input_ids"] for r in rows])
        named = torch.zeros(n_owners, len(rows), dtype=torch.bool)
        _, got = follow.step(ids[:, :span], ids[:, span:], named, subjects)
        want = torch.zeros_like(got)
        for k, subject in subjects:
            n = len(subject.split())
            sub_ids = torch.tensor(tok(subject, add_special_tokens=False)["input_ids"])
            want[k] |= (ids[:, span + 1 - n:] == sub_ids).all(-1)
        assert torch.equal(got, want), trial
        assert trial or bool(got.any())  # the test finds something to find
