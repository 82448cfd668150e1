"""Which prompt tokens become router keys (maths.loudest_tokens / distinct_tokens)."""
from __future__ import annotations

import pytest
import torch

from wisecli.methods.wise.config import WiseConfig
from wisecli.errors import ConfigError
from wisecli.runtime.maths import distinct_tokens, loudest_tokens


def _prompt() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One prompt of 5 tokens over an 8-dim space: token 0 is the sink (never scored), tokens
    1-2 are template words (loud), 3-4 the subject (quieter); the reference matches 1-2."""
    e = torch.eye(8)
    acts = torch.stack([e[0] * 50, e[1] * 4, e[2] * 3, e[3] * 2, e[4] * 1])[None]  # (1, 5, 8)
    mask = torch.ones(1, 5)
    delta = torch.eye(8)                  # ‖D a_t‖ = ‖a_t‖: loudness is the norm
    reference = torch.stack([e[1] + 0.1 * e[5], e[2]])  # the template's tokens, seen elsewhere
    return acts, mask, delta, reference


def test_loudest_keys_are_the_template_words():
    acts, mask, delta, _ = _prompt()
    picked, real = loudest_tokens(acts, mask, delta, 2)
    assert real.all()
    assert torch.equal(picked[0], acts[0, [1, 2]])


def test_distinct_keys_skip_what_other_text_matches():
    acts, mask, delta, reference = _prompt()
    basis = torch.zeros(8, 0)
    picked, real = distinct_tokens(acts, mask, delta, 2, reference, basis, cutoff=0.85)
    assert real.all()
    assert torch.equal(picked[0], acts[0, [3, 4]])   # the subject's tokens, loudest first
    # asked for more keys than there are distinct tokens: the rest are marked filler
    picked, real = distinct_tokens(acts, mask, delta, 4, reference, basis, cutoff=0.85)
    assert real.tolist() == [[True, True, False, False]]


def test_distinct_keeps_one_key_when_every_token_is_common():
    acts, mask, delta, _ = _prompt()
    reference = acts[0, 1:].clone()      # every scored token seen elsewhere
    reference[2] += 0.5 * torch.eye(8)[6] * reference[2].norm()  # token 3: cosine 0.89, the least
    picked, real = distinct_tokens(acts, mask, delta, 2, reference, torch.zeros(8, 0), cutoff=0.85)
    assert real.tolist() == [[True, False]]
    assert torch.equal(picked[0, 0], acts[0, 3])


def test_key_choice_is_validated():
    assert WiseConfig(key_choice="distinct").key_choice == "distinct"
    with pytest.raises(ConfigError, match="key_choice"):
        WiseConfig(key_choice="subject")
