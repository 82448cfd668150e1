"""A batch that changes while it runs: rows join between decode steps and leave when done.

transformers' ``generate`` fixes its batch when it starts, so a request that arrives one
step later waits for the whole batch.  Here the decoding loop is our own: a new group of
prompts is prefilled on its own cache, then its keys and values, attention mask and the
side memory's generation state are padded on the left to the running batch's length and
appended to it; a finished row is dropped from all three.  Positions are what ``generate``
gives a left-padded batch (the count of real tokens before each), so a row's greedy text
is the one it gets alone, up to float rounding of another batch shape.

Caches whose layers are not plain growing (or sliding-window) key/value tensors cannot be
joined: ``Batch.join`` says so and the new rows wait for the running batch to end.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from wisecli.app.serve.rows import Row
from wisecli.runtime.generation import join_rows, select_rows
from wisecli.runtime.gates import route_names


class Batch:
    """The running rows, their cache, attention mask and the tokens to feed next."""

    def __init__(self, model: Any, layer: Any, rows: list[Row], cache: Any, mask: torch.Tensor) -> None:
        self.model, self.layer, self.rows, self.cache, self.mask = model, layer, rows, cache, mask
        self.next: torch.Tensor | None = None  # (B, 1)
        takes = inspect.signature(model.forward).parameters
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in takes else {}  # the last position's only
        self.cache_arg = "cache" if "cache" in takes else "past_key_values"

    @classmethod
    def prefill(cls, model: Any, layer: Any, rows: list[Row], pad_id: int) -> tuple["Batch", torch.Tensor]:
        """Read the rows' prompts into a fresh cache; the logits of each row's first token."""
        device = next(model.parameters()).device
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row.prompt_ids):] = torch.tensor(row.prompt_ids)
            mask[i, width - len(row.prompt_ids):] = 1
        batch = cls(model, layer, rows, DynamicCache(config=model.config), mask.to(device))
        return batch, batch._forward(ids.to(device), (batch.mask.cumsum(-1) - 1).clamp(min=0))

    def step(self) -> torch.Tensor:
        """Feed each row its last token; the logits of the next."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        return self._forward(self.next, self.mask.sum(-1, keepdim=True) - 1)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True,
                         **self.extra, **{self.cache_arg: self.cache})
        return out.logits[:, -1].float()

    def keep(self, rows: torch.Tensor) -> None:
        """Only ``rows`` (indices) go on: the others are finished or cancelled."""
        index = rows.to(self.mask.device)
        gen = self._generation()
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys, layer.values = layer.keys[index], layer.values[index]
        self.mask, self.next = self.mask[index], None if self.next is None else self.next[index]
        self.rows = [self.rows[i] for i in rows.tolist()]
        if gen is not None:
            select_rows(gen, index)

    def join(self, other: "Batch") -> bool:
        """Append ``other``'s rows (just prefilled); False, changing nothing, where they cannot share."""
        mine, theirs = self._generation(), other._generation()
        if not _joinable(self.cache, other.cache) or (mine is None) != (theirs is None):
            return False
        width = max(self.mask.shape[1], other.mask.shape[1])
        if mine is not None and not join_rows(mine, theirs, width):
            return False
        for a, b in zip(self.cache.layers, other.cache.layers):
            n = max(a.keys.shape[-2], b.keys.shape[-2])
            a.keys = torch.cat([_left(a.keys, n), _left(b.keys, n)])
            a.values = torch.cat([_left(a.values, n), _left(b.values, n)])
            if hasattr(a, "cumulative_length"):
                a.cumulative_length = max(a.cumulative_length, b.cumulative_length)
        self.mask = torch.cat([_left(self.mask, width), _left(other.mask, width)])
        self.next = torch.cat([self.next, other.next])
        self.rows += other.rows
        return True

    def _generation(self) -> Any:
        find = getattr(self.layer, "generation_of", None)
        return find(self.cache) if find is not None else None

    def memories(self) -> list[str] | None:
        """Which memory answered each row so far (None: the model has no side memory)."""
        gen = self._generation()
        answered = None if gen is None else gen.answered
        if answered is None or answered.shape[0] != len(self.rows):
            return None
        return route_names(answered)


def _joinable(a: Any, b: Any) -> bool:
    layers_a, layers_b = getattr(a, "layers", None), getattr(b, "layers", None)
    if layers_a is None or layers_b is None or len(layers_a) != len(layers_b):
        return False
    return all(type(x) is type(y) and type(x).__name__ in ("DynamicLayer", "DynamicSlidingWindowLayer")
               and getattr(x, "keys", None) is not None and getattr(y, "keys", None) is not None
               and x.keys.dim() == 4 and y.keys.dim() == 4 for x, y in zip(layers_a, layers_b))


def _left(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` padded with zeros on the left of its sequence dimension (-2 for keys, -1 for a mask)."""
    dim = -1 if t.dim() == 2 else -2
    missing = n - t.shape[dim]
    if missing <= 0:
        return t
    return F.pad(t, (missing, 0) if dim == -1 else (0, 0, missing, 0))


def choose(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """Each row's next token: greedy, or drawn from its own generator (temperature, top-p)."""
    chosen = logits.argmax(-1)
    for i, row in enumerate(rows):
        if row.generator is not None:
            chosen[i] = _sample(logits[i], row.sampling.temperature, row.sampling.top_p, row.generator)
    return chosen


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        order = torch.argsort(probs, descending=True)
        above = torch.cumsum(probs[order], dim=-1) - probs[order]  # the mass of the tokens before each
        probs = torch.zeros_like(probs).scatter(0, order, probs[order] * (above < top_p))
    return int(torch.multinomial(probs, 1, generator=generator))
