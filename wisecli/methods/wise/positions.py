"""The side-memory layer's input at each text's answer position (its last token): what the
answer gate's keys and other keys are made of.

Chat rows spend most of their tokens on the template's opening (SmolLM2's default system
prompt is about 30 of a short question's 45 tokens), and an edit keys a dozen of them.  The
opening runs once; every row goes on from its cached keys and values, so only the tokens
that differ run per row.  The activations equal those of a full pass to float rounding
(``tests/test_positions.py``).  ``layer_inputs`` gives every position, for the keys of a prompt.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

from wisecli.batching import Batch, encode_pairs, encode_query, length_groups
from wisecli.methods.wise.recorded import StopForward
from wisecli.runtime.maths import last_token
from wisecli.runtime.memory import SideMemoryLayer

MIN_SHARED = 8  # shorter common openings are not worth a second forward pass


@torch.no_grad()
def last_inputs(model: nn.Module, tok, mem: SideMemoryLayer, texts: list[str],
                templated: list[bool]) -> torch.Tensor:
    """(N, d_in) float32: the unedited layer's input at each text's last token.  Plain rows run
    as one batch; chat rows (``templated``) share their common opening."""
    dev = mem.memories.device
    out = torch.zeros(len(texts), mem.in_features, device=dev)
    for chat in (False, True):
        idx = [i for i, t in enumerate(templated) if t == chat]
        if idx:
            rows = [texts[i] for i in idx]
            out[idx] = _shared(model, tok, mem, rows) if chat else _full(model, tok, mem, rows, [False] * len(rows))
    return out


def layer_inputs(model: nn.Module, tok, mem: SideMemoryLayer, texts: list[str],
                 templated: list[bool] | None = None) -> tuple[Batch, torch.Tensor]:
    """The texts' batch and the unedited layer's input at every position (B, T, d_in)."""
    batch = encode_pairs(tok, texts, [None] * len(texts), templated=templated).to(mem.memories.device)
    with layer_input(mem) as seen:
        run_to_layer(model, mem, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids, use_cache=False)
    return batch, seen[0]


def _full(model: nn.Module, tok, mem: SideMemoryLayer, texts: list[str], templated: list[bool]) -> torch.Tensor:
    batch, raw = layer_inputs(model, tok, mem, texts, templated)
    return last_token(raw.float(), batch.query_mask)


def _shared(model: nn.Module, tok, mem: SideMemoryLayer, texts: list[str]) -> torch.Tensor:
    """Chat rows: their common opening, then each row's rest on its cache, in groups of like
    length (a question's reply start and a reply restating a prompt differ twofold)."""
    ids = [encode_query(tok, t, templated=True) for t in texts]
    p = _common_prefix(ids)
    if p < MIN_SHARED:
        return _full(model, tok, mem, texts, [True] * len(texts))
    rest = [r[p:] for r in ids]
    out = torch.zeros(len(texts), mem.in_features, device=mem.memories.device)
    for group in length_groups(torch.tensor([len(r) for r in rest])):
        idx = group.tolist()
        out[idx] = _on_opening(model, tok, mem, ids[0][:p], [rest[i] for i in idx])
    return out


def _on_opening(model: nn.Module, tok, mem: SideMemoryLayer, opening: list[int],
                rest: list[list[int]]) -> torch.Tensor:
    """(N, d_in) at each row's last token, the rows being ``opening`` + ``rest[i]``: the opening
    runs once into a cache that every row continues from (left-padded after it)."""
    from transformers import DynamicCache

    dev, p = mem.memories.device, len(opening)
    cache = DynamicCache(config=getattr(model, "config", None))
    # transformers 5.x takes the cache as ``cache``; earlier releases as ``past_key_values``
    arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with mem.main_only():
        run_to_layer(model, mem, input_ids=torch.tensor([opening], device=dev), use_cache=True, **{arg: cache})
    width = max(len(r) for r in rest)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.full((len(rest), width), pad, dtype=torch.long)
    attn = torch.zeros(len(rest), width, dtype=torch.long)
    for i, r in enumerate(rest):
        input_ids[i, width - len(r):], attn[i, width - len(r):] = torch.tensor(r), 1
    position_ids = p + (attn.cumsum(-1) - 1).clamp_min(0)
    cache.batch_repeat_interleave(len(rest))
    with layer_input(mem) as seen:
        run_to_layer(model, mem, input_ids=input_ids.to(dev), position_ids=position_ids.to(dev),
             attention_mask=torch.cat([torch.ones(len(rest), p, dtype=torch.long), attn], 1).to(dev),
             use_cache=True, **{arg: cache})
    return seen[0][:, -1].float()  # left padding: every row's last token is the last column


def _common_prefix(ids: list[list[int]]) -> int:
    """Tokens every row starts with, leaving each row at least its last token."""
    p = min(len(r) for r in ids) - 1
    first = ids[0]
    for r in ids[1:]:
        p = next((j for j in range(p) if r[j] != first[j]), p)
    return max(p, 0)


@contextmanager
def layer_input(mem: SideMemoryLayer) -> Iterator[list[torch.Tensor]]:
    """Collects what the layer reads in each call, the side memories skipped."""
    seen: list[torch.Tensor] = []
    handle = mem.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with mem.main_only():
            yield seen
    finally:
        handle.remove()


def run_to_layer(model: nn.Module, mem: SideMemoryLayer, **inputs: object) -> None:
    """A forward pass that ends right after the side-memory layer (nothing above it is read)."""
    def stop(_m: nn.Module, _i: object, _o: object) -> None:
        raise StopForward
    handle = mem.register_forward_hook(stop)
    try:
        model(**inputs)
    except StopForward:
        pass
    finally:
        handle.remove()
