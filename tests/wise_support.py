"""Shared by the WISE tests on tiny random checkpoints: the two architectures, the
fixtures that open them, and a forward pass the way evaluation and generation batch prompts.

The fixtures are imported into each test module (pytest finds them there), so the
tests in one file can run alone.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wisecli.batching import encode_pairs

ARCHS = ["llama", "gpt2"]


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


def arch_dir(request, arch: str) -> Path:
    return request.getfixturevalue(f"tiny_{arch}_dir")


@pytest.fixture
def model_dir(request, arch) -> Path:
    return arch_dir(request, arch)


def logits(model, tok, texts: list[str]) -> torch.Tensor:
    """Left-padded batch with explicit position ids (what evaluation and generation use)."""
    batch = encode_pairs(tok, texts, [None] * len(texts))
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids).logits


def route(sess, text: str) -> torch.Tensor:
    logits(sess.model, sess.tokenizer, [text])
    return sess.mem.last_route.clone()
