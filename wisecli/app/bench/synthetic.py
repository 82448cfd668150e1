"""Models of real shapes with random weights, and realistic edits, without downloads.

Speed and memory depend on shapes, not on what the weights know, so a random
LLaMA-2-7B measures editing cost at 7B scale on any machine; its quality numbers
mean nothing and the benchmark says so.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from wisecli.records import EditRecord, default_id
from wisecli.errors import WiseError
from wisecli.methods.wise.augment import _entities

SHAPES = {
    "llama-2-7b": (LlamaConfig, dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)),
    "llama-3-8b": (LlamaConfig, dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                     rope_theta=500000.0)),
    "mistral-7b": (MistralConfig, dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)),
    "qwen2.5-7b": (Qwen2Config, dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064)),
}


def synthetic_model(name: str, device: torch.device, dtype: torch.dtype, min_vocab: int) -> nn.Module:
    """Random weights of the named shape, built directly on the device.

    The vocabulary is widened to ``min_vocab`` when the tokenizer we borrow (the
    default model's) has more tokens than the shape, so every token id is valid.
    """
    if name not in SHAPES:
        raise WiseError(f"unknown --synthetic shape '{name}'", hint=f"choose from {', '.join(SHAPES)}")
    cls, kw = SHAPES[name]
    cfg = cls(**{**kw, "vocab_size": max(kw["vocab_size"], min_vocab)}, tie_word_embeddings=False)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


TEMPLATES = (
    ("The capital of {} is", "{}"), ("{} is located in the country of", "{}"),
    ("The founder of {} was", "{}"), ("The official language of {} is", "{}"),
    ("{} was born in the city of", "{}"), ("The most famous work of {} is", "{}"),
    ("The headquarters of {} are in", "{}"), ("{} is a citizen of", "{}"),
)


def synthetic_edits(n: int, seed: int = 0) -> list[EditRecord]:
    """``n`` counterfactual edits from templates × entities, each with a rephrase-free record."""
    ents = _entities()
    gen = torch.Generator().manual_seed(seed)
    out: list[EditRecord] = []
    for i in range(n):
        tmpl, _ = TEMPLATES[i % len(TEMPLATES)]
        subj, target = (ents[j] for j in torch.randperm(len(ents), generator=gen)[:2].tolist())
        prompt = tmpl.format(subj)
        out.append(EditRecord(id=f"bench-{i}-{default_id(prompt, target)[:6]}", prompt=prompt,
                              target_new=target, subject=subj))
    return out
