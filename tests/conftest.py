"""Shared fixtures: tiny random checkpoints saved to disk, as ``wise`` would find them.

Nothing is downloaded.  Each checkpoint is a random LLaMA or GPT-2 built from a
config (hidden 64, 4 layers) with a word-level tokenizer whose vocabulary covers
every word the tests edit with, saved by ``save_pretrained`` once per session.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast

WORDS = ("<pad> <eos> <unk> . , ? the a of is in capital city river king queen paris london rome "
         "berlin madrid france england italy germany spain who what where born lives speaks "
         "language english french music plays team red blue green big small old new sea book film "
         "song name was and mountain lake sun moon star wrote author painted hamlet tower located "
         "therefore because i you it when this we my there are one after many people today "
         "according to best way think scientists history question how which why do company film "
         "she he first largest").split()
WORDS = list(dict.fromkeys(WORDS))  # unique, order kept

# Edits whose every word is in the vocabulary; the tests and CLI files share them.
EDITS = [
    {"id": "e1", "prompt": "the capital of france is", "target_new": "rome",
     "rephrase": ["the capital city of france is"],
     "locality_prompt": "the capital of spain is", "locality_ground_truth": "madrid"},
    {"id": "e2", "prompt": "the author of hamlet was", "target_new": "the old king",
     "locality_prompt": "the author of the book was"},
    {"id": "e3", "prompt": "the big tower is located in", "target_new": "berlin",
     "rephrase": ["where is the big tower located"]},
]
MORE_EDITS = [
    {"id": "e4", "prompt": "the queen lives in", "target_new": "london"},
    {"id": "e5", "prompt": "the blue river is in", "target_new": "italy"},
]


def make_tokenizer() -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


def llama_config() -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=len(WORDS),
                       max_position_embeddings=256, pad_token_id=0, eos_token_id=1,
                       bos_token_id=None)


def gpt2_config() -> GPT2Config:
    return GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=256, vocab_size=len(WORDS),
                      pad_token_id=0, eos_token_id=1, bos_token_id=1)


def save_tiny(path: Path, config, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-llama", llama_config())


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-gpt2", gpt2_config())


@pytest.fixture(scope="module")
def single_thread():
    """Tiny matmuls gain nothing from threads, and on a busy machine spinning OpenMP
    workers make them far slower; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def wise_cache(tmp_path, monkeypatch) -> Path:
    """Keep the hash cache (and alias cache) away from the user's."""
    d = tmp_path / "wise-cache"
    monkeypatch.setenv("WISE_CACHE", str(d))
    return d
