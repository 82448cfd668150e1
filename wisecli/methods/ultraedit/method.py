"""UltraEdit behind the method seam: several linear layers edited in place, nothing routed.

What the application needs to know about it: which layers a run edits (the architecture's
table, the config's ``modules``/``layers``, or ``--layer``s; a checkpoint keeps its own),
how a continued run keeps the statistics it continues (same layers, same passes), and how
a checkpoint's shifts are put back: already in an embedded checkpoint's weights, added to
the base's for a patch-only one.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from wisecli.errors import CheckpointError, ConfigError
from wisecli.methods.base import Method
from wisecli.methods.locate import ARCHITECTURES, count_layers
from wisecli.methods.ultraedit.config import UltraEditConfig, edited_modules, from_dict, load_config
from wisecli.methods.ultraedit.editor import UltraEditor
from wisecli.methods.ultraedit.weights import EditedWeights

STATISTIC = re.compile(r"(mean|var|count)_\d+_\d+x\d+|edited_\d+")


@dataclass(frozen=True)
class EditedTarget:
    """The linear layers a run writes its shifts into."""

    model_type: str
    layers_path: str
    n_layers: int
    modules: tuple[str, ...]

    @property
    def layers(self) -> list[int]:
        return sorted({int(m) for path in self.modules for m in path.split(".") if m.isdigit()})

    @property
    def layer(self) -> int:
        """The first edited block (a WISE-shaped field the application passes along unused)."""
        return self.layers[0] if self.layers else 0

    @property
    def where(self) -> str:
        inner = sorted({re.sub(r".*\.\d+\.", "", m) for m in self.modules})
        return f"{len(self.modules)} linear layers ({', '.join(inner)}) in blocks {_ranges(self.layers)}"

    def describe(self) -> dict:
        return {"modules": list(self.modules), "layers": self.layers, "n_layers": self.n_layers, "kind": "linear"}


def _ranges(values: list[int]) -> str:
    parts, start = [], None
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(v) if start == v else f"{start}–{v}")
            start = None
    return ", ".join(parts)


def locate(model: nn.Module, layer: int | tuple[int, ...] | None, module_path: str | None,
           config_file: str | None, saved: dict | None = None) -> EditedTarget:
    """A checkpoint's layers; else ``--module-path``, ``--layer``s, the config, the table."""
    model_type = str(model.config.model_type)
    layers_path = ARCHITECTURES.get(model_type, ("", ""))[0]
    if saved is not None:
        if layer is not None or module_path is not None:
            raise ConfigError("--layer/--module-path differ from the checkpoint's layers",
                              hint="a patched checkpoint keeps the layers it edits; omit them")
        modules = tuple(saved["modules"])
    elif module_path is not None:
        modules = tuple(edited_modules(model, UltraEditConfig(modules=(module_path,))))
    else:
        modules = tuple(edited_modules(model, load_config(config_file, model_type, {"layer": layer})))
    n_layers = count_layers(model) if model_type in ARCHITECTURES else 0
    return EditedTarget(model_type, layers_path, n_layers, modules)


def attach(model: nn.Module, target: EditedTarget, tokenizer: Any = None) -> EditedWeights:
    """Nothing is put into the model: the holder remembers the layers' unedited weights."""
    return EditedWeights(model, list(target.modules))


def check_state(manifest: dict, tensors: dict[str, torch.Tensor], where: str) -> None:
    """A shift per recorded layer, the statistics, nothing else; every value finite."""
    def bad(message: str) -> CheckpointError:
        return CheckpointError(f"{where}: {message}", hint="the checkpoint is damaged; re-create it with wise edit")
    modules = manifest["target"].get("modules")
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
        raise bad("the manifest's target lists no edited modules")
    wanted = {f"shift.{m}" for m in modules} | {"n_turns"}
    for name in sorted(wanted - set(tensors)):
        raise bad(f"tensor '{name}' is missing")
    for name, t in sorted(tensors.items()):
        if name not in wanted and not STATISTIC.fullmatch(name):
            raise bad(f"tensor '{name}' is not one wise writes")
        if t.is_floating_point() and (t.dtype != torch.float32 or not bool(torch.isfinite(t).all())):
            raise bad(f"tensor '{name}' is not finite float32")


def restore(weights: EditedWeights, tensors: dict[str, torch.Tensor], manifest: dict) -> None:
    for path in weights.paths:
        want = tuple(weights.linear(path).weight.shape)
        if tuple(tensors[f"shift.{path}"].shape) != want:
            raise CheckpointError(f"shift of {path} has shape {tuple(tensors[f'shift.{path}'].shape)}; "
                                  f"the layer is {want}")
    stats = {k: v for k, v in tensors.items() if not k.startswith("shift.")}
    weights.restore({p: tensors[f"shift.{p}"] for p in weights.paths}, stats,
                    in_weights=bool(manifest["base"]["embedded"]))


def resolve_config(model: nn.Module, weights: EditedWeights, manifest: dict | None, layer: int,
                   config_file: str | None, overrides: dict[str, Any]) -> UltraEditConfig:
    """The run's settings, recording the layers actually edited; a continued run keeps the
    checkpoint's layers and passes (its statistics are theirs) and may change the rest."""
    over = {k: v for k, v in overrides.items() if k != "seed"}  # deterministic: no seed to take
    if manifest is None:
        cfg = load_config(config_file, model.config.model_type, over)
        return dataclasses.replace(cfg, modules=tuple(weights.paths), layers=())
    saved = from_dict(manifest["config"], "wise.json")
    cfg = load_config(config_file, None, {**over, "layer": None}, base=saved.to_dict())
    for name in ("modules", "layers", "passes"):
        if getattr(cfg, name) != getattr(saved, name):
            raise ConfigError(f"{config_file}: field '{name}' differs from the checkpoint's",
                              hint="a patched checkpoint keeps its edited layers and passes")
    return cfg


def editor(model: nn.Module, tokenizer: Any, weights: EditedWeights, blocks: nn.Module, layer: int,
           cfg: UltraEditConfig, state: dict | None) -> UltraEditor:
    return UltraEditor(model, tokenizer, weights, cfg, state)


def summary(weights: EditedWeights) -> dict[str, Any]:
    norms = [float(weights.shift(p).norm()) for p in weights.paths]
    return {"turns": int(weights.n_turns), "edited_layers": len(weights.paths),
            "largest_shift_norm": round(max(norms, default=0.0), 4)}


ULTRAEDIT = Method(name="ultraedit", load_config=load_config, config_from_dict=from_dict,
                   resolve_config=resolve_config, locate=locate, attach=attach, check_state=check_state,
                   restore=restore, editor=editor, summary=summary, plain=True)
