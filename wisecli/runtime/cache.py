"""The generation cache after an answer: recomputed without the side memory.

The memory acts on every prompt position, so the keys and values that the layers above it
cache for the prompt carry the edit.  Once the memory has written its answer the router
shuts it, but the unedited weights go on reading those states and write the answer again
("Essex Essex Essex", docs/experiments.md 2026-12-06).  So the rows that have just written
their answer get the cache the unedited model would have built for the same text.

Only the blocks from the memory's up differ from the unedited model's, so only they are
rerun: the blocks below are stood in for by the residual stream they produced, recorded
as generation goes.  That works for any decoder whose blocks pass a hidden-state tensor
along; the first refresh of each model is checked against rerunning every block, and a
decoder where the two disagree keeps rerunning every block.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, ContextManager, Iterator

import torch
import torch.nn as nn


def cache_of(kwargs: dict) -> Any:
    # transformers 5.x passes the cache as ``cache``; earlier releases as ``past_key_values``.
    return next((kwargs[k] for k in ("cache", "past_key_values") if kwargs.get(k) is not None), None)


class _Given(nn.Module):
    """A block below the memory's during a refresh: it hands on the recorded residual stream."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, *_args: Any, **_kwargs: Any) -> torch.Tensor:
        return self.hidden


class CacheRefresher:
    """Records the residual stream entering the memory's block, and rewrites cached rows.

    ``main_only`` is the memory layer's context that skips the side memories; ``layer`` is
    the memory layer, used to find its block; ``recording`` gives the generation whose
    residual stream this call records (None: nothing to record).
    """

    def __init__(self, model: nn.Module, layer: nn.Module, main_only: Callable[[], ContextManager],
                 recording: Callable[[], Any]) -> None:
        self.model, self.main_only, self.recording = model, main_only, recording
        self.blocks, self.index = _block_of(model, layer)
        self.fast: bool | None = None if self.blocks is not None and self.index > 0 else False
        self._busy = False                     # inside a refresh: nothing is recorded
        self._handle = None
        if self.fast is not False:
            self._handle = self.blocks[self.index].register_forward_pre_hook(self._record, with_kwargs=True)

    def close(self) -> None:
        """Stop recording (the memory is taken out of the model, or installed anew)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _record(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Keep the residual stream of every position the cache holds, in the generation."""
        if self._busy:
            return
        gen = self.recording()
        if gen is None:
            return
        h = args[0] if args else kwargs.get("hidden_states")
        cached = next((a for a in (*args[1:], *kwargs.values()) if hasattr(a, "get_seq_length")), None)
        if not isinstance(h, torch.Tensor) or h.dim() != 3 or torch.is_grad_enabled() or cached is None:
            gen.drop_hidden()  # not generating: nothing to refresh later
            return
        gen.record_hidden(h, cached.get_seq_length(self.index))

    @torch.no_grad()
    def refresh(self, kwargs: dict, rows: torch.Tensor, ids: torch.Tensor, generation: Any) -> bool:
        """Recompute the cached keys and values of ``rows`` without the side memory.

        ``ids`` is the text the cache holds, ``generation`` the residual stream recorded for
        it (``Generation.hidden``), and ``kwargs`` the decode step's own arguments
        (its attention mask covers the cache and the new token).  The positions are the ones
        transformers' ``generate`` gives a left-padded batch.  Returns False, changing nothing,
        for a cache this does not know how to rewrite.
        """
        cache, mask = cache_of(kwargs), kwargs.get("attention_mask")
        layers = getattr(cache, "layers", None)
        n = ids.shape[1]
        if mask is None:  # some models' generate drops a mask that pads nothing
            mask = torch.ones_like(ids)
        if layers is None or not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[1] < n:
            return False
        if any(getattr(c, "keys", None) is None or c.keys.shape[-2] != n for c in layers):
            return False
        sub = rows.nonzero().flatten().to(ids.device)  # only those rows: a prefill of the whole batch costs more
        call = (ids[sub], mask[sub, :n], cache, "cache" if "cache" in kwargs else "past_key_values")
        fresh = self._rerun(call, sub, generation.hidden)
        if fresh is None or len(fresh.layers) != len(layers):
            return False
        start = self.index if self.fast else 0
        if any(f.keys.shape[1:] != c.keys.shape[1:] for f, c in zip(fresh.layers[start:], layers[start:])):
            return False
        for f, c in zip(fresh.layers[start:], layers[start:]):
            c.keys[sub] = f.keys.to(c.keys.dtype)
            c.values[sub] = f.values.to(c.values.dtype)
        return True

    def _rerun(self, call: tuple, sub: torch.Tensor, hidden: torch.Tensor | None) -> Any:
        """The unedited cache of the rows: from the memory's block up once that is known to
        agree with every block rerun (checked on the first refresh), else every block."""
        usable = (hidden is not None and hidden.shape[1] >= call[0].shape[1]
                  and hidden.shape[0] == call[2].layers[-1].keys.shape[0])
        if self.fast is False or not usable:
            return self._forward(call)
        try:
            quick = self._forward(call, hidden[sub][:, :call[0].shape[1]])
        except Exception:  # a decoder whose blocks are not plain hidden-state maps
            quick = None
        if self.fast:
            return quick
        full = self._forward(call)
        self.fast = quick is not None and _same(quick, full, self.index)
        return full

    def _forward(self, call: tuple, hidden: torch.Tensor | None = None) -> Any:
        ids, mask, cache, name = call
        fresh = type(cache)(config=getattr(self.model, "config", None))
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        self._busy = True
        try:
            with self.main_only(), self._below_given(hidden):
                self.model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions,
                                         use_cache=True, **{name: fresh})
        finally:
            self._busy = False
        return fresh

    @contextmanager
    def _below_given(self, hidden: torch.Tensor | None) -> Iterator[None]:
        if hidden is None:
            yield
            return
        below = [self.blocks[i] for i in range(self.index)]
        given = _Given(hidden)
        try:
            for i in range(self.index):
                self.blocks[i] = given
            yield
        finally:
            for i, block in enumerate(below):
                self.blocks[i] = block


def _block_of(model: nn.Module, layer: nn.Module) -> tuple[nn.ModuleList | None, int]:
    """The decoder's list of blocks and the index of the one holding ``layer``."""
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    if decoder is None:
        return None, -1
    for child in decoder.children():
        if isinstance(child, nn.ModuleList):
            for i, block in enumerate(child):
                if any(m is layer for m in block.modules()):
                    return child, i
    return None, -1


def _same(a: Any, b: Any, start: int) -> bool:
    for x, y in zip(a.layers[start:], b.layers[start:]):
        if x.keys.shape != y.keys.shape:
            return False
        scale = float(y.keys.abs().max()) + 1e-6
        if float((x.keys - y.keys).abs().max()) > 1e-3 * scale:
            return False
    return True
