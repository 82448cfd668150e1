"""The edited linear layers of a model and UltraEdit's lifelong statistics, as one module.

Not a layer of the model: the edits live in the model's own weights.  This holder keeps,
in buffers, what a run needs beyond them: each edited layer's unedited weight (so that
``main_only`` gives the unedited model exactly), the float32 sum of every shift written so
far (a bf16 weight would round small shifts away; the weight is always unedited + sum, cast
once), and the running mean and variance of the normalised features per layer shape, which
every later turn continues.
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

    def __init__(self, model: nn.Module, paths: list[str]) -> None:
        super().__init__()
        self.paths = list(paths)
        self._linears = {p: get_module(model, p) for p in self.paths}  # not submodules: the model owns them
        for i, p in enumerate(self.paths):
            weight = self._linears[p].weight.detach()
            self.register_buffer(f"original_{i}", weight.clone())
            self.register_buffer(f"shift_{i}", torch.zeros(weight.shape, device=weight.device))
        self.register_buffer("n_turns", torch.zeros((), dtype=torch.long, device=self.original_0.device
                                                    if self.paths else None))
        self.last_route = self.answered_route = None  # nothing is routed

    def linear(self, path: str) -> nn.Linear:
        return self._linears[path]

    def original(self, path: str) -> torch.Tensor:
        return getattr(self, f"original_{self.paths.index(path)}")

    def shift(self, path: str) -> torch.Tensor:
        """What the edits added to the layer's weight so far (float32)."""
        return getattr(self, f"shift_{self.paths.index(path)}")

    def moments(self, key: str, d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The running statistics ``key`` (a pass and a layer shape) of ``d`` features; none
        seen yet: mean 0, variance 1, count 0."""
        if not hasattr(self, f"count_{key}"):
            return torch.zeros(d, device=device), torch.ones(d, device=device), 0.0
        return getattr(self, f"mean_{key}"), getattr(self, f"var_{key}"), float(getattr(self, f"count_{key}"))

    def set_moments(self, key: str, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        """Registered on first use: each pass of a turn keeps statistics of its own."""
        self.register_buffer(f"mean_{key}", mean.detach().float().clone())
        self.register_buffer(f"var_{key}", var.detach().float().clone())
        self.register_buffer(f"count_{key}", torch.tensor(float(count)))

    def edited_moment(self, path: str) -> torch.Tensor | None:
        """Σ k kᵀ of the keys of every edit written into ``path`` in earlier turns (None: none yet)."""
        return getattr(self, f"edited_{self.paths.index(path)}", None)

    @torch.no_grad()
    def add_edited_keys(self, path: str, keys: torch.Tensor) -> None:
        keys = keys.float()
        moment = self.edited_moment(path)
        added = keys.T @ keys
        self.register_buffer(f"edited_{self.paths.index(path)}", added if moment is None else moment + added)

    def statistics(self) -> dict[str, torch.Tensor]:
        """What a later run continues from: the running moments, the earlier edits' keys and the
        number of turns."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith(("original_", "shift_"))}

    @torch.no_grad()
    def add_shift(self, path: str, delta: torch.Tensor) -> None:
        shift = self.shift(path)
        shift += delta.to(shift.device)
        self._write(path)

    @torch.no_grad()
    def restore(self, shifts: dict[str, torch.Tensor], statistics: dict[str, torch.Tensor], in_weights: bool) -> None:
        """A checkpoint's shifts: already in the loaded weights (``in_weights``: the unedited
        weight is what is left without them), or to add to the unedited base's."""
        for name, value in statistics.items():
            if name == "n_turns":
                self.n_turns.fill_(int(value))
            else:
                self.register_buffer(name, value.detach().float().to(self.n_turns.device).clone())
        for path in self.paths:
            shift = self.shift(path)
            shift.copy_(shifts[path].to(shift.device))
            if in_weights:
                original = self.original(path)
                original.copy_((original.float() - shift).to(original.dtype))
            self._write(path)

    def _write(self, path: str) -> None:
        weight, original = self.linear(path).weight, self.original(path)
        weight.copy_((original.float() + self.shift(path)).to(weight.dtype))

    @property
    def n_memories(self) -> int:
        """1 once any edit has been written into the weights, else 0 (nothing is routed)."""
        return int(self.n_turns.item() > 0)

    @contextmanager
    def main_only(self) -> Iterator[None]:
        with torch.no_grad():
            for p in self.paths:
                self.linear(p).weight.copy_(self.original(p))
        try:
            yield
        finally:
            with torch.no_grad():
                for p in self.paths:
                    self._write(p)

    @contextmanager
    def routing_on(self, _token_mask: torch.Tensor) -> Iterator[None]:
        yield
