"""The seam between the application and an editing method.

The pipeline, the checkpoint, ``wise eval``, ``serve``, ``export`` and the Python API are
written once against ``Method`` (peft's tuner pattern, in small): a method says where in a
model it edits and what runtime layer it attaches there, how its hyper-parameters are read,
how its saved state is checked and restored, and gives an ``Editor`` that prepares, applies
batches of edits and hands back the state to save.  A method is added by a folder of its
own and one entry in ``methods.REGISTRY``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Protocol, Sequence

import torch
import torch.nn as nn

from wisecli.records import EditRecord

Progress = Callable[[dict[str, Any]], None]  # {"done", "shard", "step", "loss"} as editing goes


class EditedLayer(Protocol):
    """What the application reads of a method's runtime layer while it evaluates, generates
    and serves.  A method that writes plain weights and routes nothing still answers these:
    ``main_only`` gives the unedited model, the routes are None."""

    @property
    def n_memories(self) -> int:
        """How many separately routed stores of edits the layer holds (0: nothing edited)."""

    @property
    def last_route(self) -> torch.Tensor | None:
        """(B,) which store answered each row of the last call (-1: none; None: not routed)."""

    @property
    def answered_route(self) -> torch.Tensor | None:
        """(B,) which store answered each row of the last generation."""

    def main_only(self) -> ContextManager[None]:
        """The unedited model, exactly, inside the context."""

    def routing_on(self, token_mask: torch.Tensor) -> ContextManager[None]:
        """Decide on these tokens only (the prompt, not a teacher-forced answer)."""


class Editor(Protocol):
    """One run of a method over a model: prepared once, then batches of edits, then saved."""

    def prepare(self, negatives: list[str] | None, source: str) -> None:
        """What the method measures or writes once per model before any edit."""

    def apply(self, records: Sequence[EditRecord], progress: Progress | None = None) -> list[dict]:
        """Apply one batch on top of everything before it; one dict per edit (its ``id`` and
        where it went: ``shard``, ``steps``, ``memory``, ``subject``)."""

    def saved(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The tensors (``wise.safetensors``) and the JSON state (the manifest's ``editor``)
        that let a later run continue where this one stopped."""


@dataclass(frozen=True)
class Method:
    """An editing method as the application sees it (every field a plain function)."""

    name: str
    # hyper-parameters: (config file or None, model_type or None, CLI overrides) -> frozen config
    load_config: Callable[[str | None, str | None, dict[str, Any]], Any]
    # a manifest's recorded config, validated: (its dict, where it was read) -> frozen config
    config_from_dict: Callable[[dict[str, Any], str], Any]
    # the run's config: (model, attached layer, the checkpoint's manifest or None, the edited
    # layer's index, config file, CLI overrides); a continued run keeps what it must
    resolve_config: Callable[[nn.Module, nn.Module, dict | None, int, str | None, dict[str, Any]], Any]
    # where it edits: (model, --layer(s) or None, module path or None, config file, the
    # checkpoint's recorded ``target`` or None) -> target, with ``where`` (a label for
    # messages), ``layer`` and ``describe()`` (the manifest's ``target``)
    locate: Callable[[nn.Module, Any, str | None, str | None, dict | None], Any]
    # the runtime layer put at the target (``EditedLayer``; what modeling_wise.py attaches too)
    attach: Callable[[nn.Module, dict, Any], nn.Module]
    # a checkpoint's saved state, checked, then restored into the attached layer
    check_state: Callable[[dict, dict[str, torch.Tensor], str], None]
    restore: Callable[[nn.Module, dict[str, torch.Tensor], dict], None]
    # (model, tokenizer, attached layer, decoder blocks, layer index, config, JSON state or None)
    editor: Callable[..., Editor]
    # a readable summary of the attached layer's state for the manifest (its ``router``)
    summary: Callable[[nn.Module], dict[str, Any]]
    # True for a method whose edits are plain weights: its saved tensors ``shift.<module
    # path>`` are what it added to the unedited base's weights, and the checkpoint holds
    # the edited weights themselves under the base's own config.json (``checkpoint.py``)
    plain: bool = False
