"""The edited linear layers of a model and UltraEdit's lifelong statistics, as one module.

Not a layer of the model: the edits live in the model's own weights.  This holder keeps,
in buffers, what a run needs beyond them: each edited layer's unedited weight (so that
``main_only`` gives the unedited model exactly, and a checkpoint stores only the shift),
and the running mean and variance of the normalised features per layer shape, which every
later turn continues.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

from wisecli.methods.locate import get_module


def shape_key(module: nn.Linear) -> str:
    return f"{module.in_features}x{module.out_features}"


class EditedWeights(nn.Module):
    """Answers ``methods.base.EditedLayer`` for a model whose weights were edited in place."""

    def __init__(self, model: nn.Module, paths: list[str], passes: int) -> None:
        super().__init__()
        self.paths = list(paths)
        self._linears = {p: get_module(model, p) for p in self.paths}  # not submodules: the model owns them
        for i, p in enumerate(self.paths):
            self.register_buffer(f"original_{i}", self._linears[p].weight.detach().clone())
        for shape in sorted({shape_key(m) for m in self._linears.values()}):
            d = sum(int(x) for x in shape.split("x"))
            for step in range(passes):  # each pass of a turn normalises with statistics of its own
                key = f"{step}_{shape}"
                self.register_buffer(f"mean_{key}", torch.zeros(d))
                self.register_buffer(f"var_{key}", torch.ones(d))
                self.register_buffer(f"count_{key}", torch.zeros(()))
        self.register_buffer("n_turns", torch.zeros((), dtype=torch.long))
        self.last_route = self.answered_route = None  # nothing is routed

    def linear(self, path: str) -> nn.Linear:
        return self._linears[path]

    def original(self, path: str) -> torch.Tensor:
        return getattr(self, f"original_{self.paths.index(path)}")

    def shift(self, path: str) -> torch.Tensor:
        """What the edits added to the layer's weight so far (float32)."""
        return self.linear(path).weight.detach().float() - self.original(path).float()

    def moments(self, key: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        return getattr(self, f"mean_{key}"), getattr(self, f"var_{key}"), float(getattr(self, f"count_{key}"))

    def set_moments(self, key: str, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        getattr(self, f"mean_{key}").copy_(mean)
        getattr(self, f"var_{key}").copy_(var)
        getattr(self, f"count_{key}").fill_(count)

    @torch.no_grad()
    def add_shift(self, path: str, delta: torch.Tensor) -> None:
        weight = self.linear(path).weight
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))

    @property
    def n_memories(self) -> int:
        """1 once any edit has been written into the weights, else 0 (nothing is routed)."""
        return int(self.n_turns.item() > 0)

    @contextmanager
    def main_only(self) -> Iterator[None]:
        edited = [self.linear(p).weight.detach().clone() for p in self.paths]
        with torch.no_grad():
            for p in self.paths:
                self.linear(p).weight.copy_(self.original(p))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(self.paths, edited):
                    self.linear(p).weight.copy_(w)

    @contextmanager
    def routing_on(self, _token_mask: torch.Tensor) -> Iterator[None]:
        yield
