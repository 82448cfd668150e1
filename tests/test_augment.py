"""Text augmentation with no model: near-miss subjects and reworded prompts."""
from __future__ import annotations

from wisecli.methods.wise.augment import neighbours, reworded, subject_of

PROMPT = "What is the country of origin of Big Bad Wolf?"


def test_reworded_keeps_subject_and_final_word():
    out = reworded(PROMPT, None, 6, seed=1)
    assert len(out) == 6
    words = PROMPT.split()
    for text in out:
        assert "Big Bad Wolf?" in text            # the subject and the word the answer follows
        kept = text.split()
        assert len(words) - 2 <= len(kept) <= len(words) - 1
        it = iter(words)                          # what is left is the prompt, in order
        assert all(w in it for w in kept)
    assert len(set(out)) > 1
    assert reworded(PROMPT, None, 6, seed=1) == out   # seeded: a later run rebuilds the same rows


def test_reworded_with_nothing_to_drop_repeats_the_prompt():
    assert reworded("Paris?", "Paris", 3, seed=0) == ["Paris?"] * 3
    assert reworded(PROMPT, None, 0, seed=0) == []


def test_reworded_protects_a_given_subject():
    out = reworded("The capital of New South Wales is", "New South Wales", 8, seed=2)
    assert all("New South Wales is" in t for t in out)


def test_neighbours_replace_the_subject():
    assert subject_of(PROMPT, None) == "Big Bad Wolf"
    out = neighbours(PROMPT, None, 3, seed=0)
    assert len(out) == 3 and all("Big Bad Wolf" not in t and t.startswith("What is the country") for t in out)
