"""UltraEdit's hyper-parameters, and which linear layers it edits per architecture."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch.nn as nn

from wisecli.errors import ConfigError, ModelError
from wisecli.methods.locate import ARCHITECTURES, count_layers, get_module
from wisecli.methods.wise.config import key_lines, read_yaml  # the YAML reading every method shares

# model_type -> (module inside a block, first and last block as fractions of the depth).
# UltraEdit's LLaMA-3 ZsRE choice (gate projections early-middle, up projections
# middle-late), as fractions so that it scales with the number of blocks.
EDITED: dict[str, tuple[tuple[str, float, float], ...]] = {
    t: (("mlp.gate_proj", 0.33, 0.47), ("mlp.up_proj", 0.57, 0.77))
    for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3", "olmo2", "smollm3")}


@dataclass(frozen=True)
class UltraEditConfig:
    learning_rate: float = 1e-4      # scale of the wanted output shift (UltraEdit's ``lr``)
    ridge: float = 1.0               # weight of ‖ΔW‖² in the least-squares solve
    passes: int = 3                  # closed-form steps per turn, each read on the model the last one left
    preserve: float = 30.0           # weight of unrelated text's keys in the solve, per edit position; 0: none
    keep_edits: float = 1.0          # weight of earlier turns' edit keys in the solve; 0: none
    modules: tuple[str, ...] = ()    # dotted paths of the linear layers edited; () = the table above
    layers: tuple[int, ...] = ()     # blocks whose table modules are edited; () = the table's ranges
    batch_size: int = 16             # edits per forward/backward pass (memory only, not the result)

    def __post_init__(self) -> None:
        for name in ("learning_rate", "ridge"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"field '{name}': must be a number > 0, got {value!r}")
        for name in ("preserve", "keep_edits"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ConfigError(f"field '{name}': must be a number >= 0, got {value!r}")
        for name in ("passes", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"field '{name}': must be an integer >= 1, got {value!r}")
        if not all(isinstance(m, str) and m for m in self.modules):
            raise ConfigError("field 'modules': must be a list of dotted module paths")
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers):
            raise ConfigError("field 'layers': must be a list of block indices (integers >= 0)")
        if self.modules and self.layers:
            raise ConfigError("fields 'modules' and 'layers' both choose the edited layers; give one")

    @property
    def mode(self) -> str:
        """What the manifest and reports call how edits are kept: in the weights themselves."""
        return "weights"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["modules"], data["layers"] = list(self.modules), list(self.layers)
        return data


def from_dict(data: dict[str, Any], where: str = "config", lines: dict[str, int] | None = None) -> UltraEditConfig:
    """A validated config; errors name ``where`` and, when ``lines`` are known, the key's line."""
    def at(key: str) -> str:
        return f"{where}:{lines[key]}" if lines and key in lines else where
    known = {f.name for f in fields(UltraEditConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{at(unknown[0])}: unknown key '{unknown[0]}'",
                          hint=f"UltraEdit's keys: {', '.join(sorted(known))}")
    values = dict(data)
    for key in ("modules", "layers"):
        if key in values:
            if not isinstance(values[key], (list, tuple)):
                raise ConfigError(f"{at(key)}: field '{key}': must be a list")
            values[key] = tuple(values[key])
    try:
        return UltraEditConfig(**values)
    except ConfigError as exc:
        field = re.search(r"field '(\w+)'", str(exc))
        raise ConfigError(f"{at(field.group(1)) if field else where}: {exc}") from None


def load_config(path: str | Path | None, model_type: str | None = None,
                overrides: dict[str, Any] | None = None, base: dict[str, Any] | None = None) -> UltraEditConfig:
    """Defaults (or ``base``, a checkpoint's settings), then the YAML file, then the CLI's
    ``--layer``s.  The table of edited layers is per architecture (``EDITED``), not a preset."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        loaded, text = read_yaml(Path(path))
        from_dict(loaded, str(path), key_lines(text))
        data.update(loaded)
    over = overrides or {}
    if over.get("mode") is not None:
        raise ConfigError(f"--mode {over['mode']} is for wise's side memories; ultraedit writes its edits "
                          "into the weights", hint="omit --mode")
    layer = over.get("layer")
    if layer is not None:
        data.update(layers=tuple(layer) if isinstance(layer, (tuple, list)) else (layer,), modules=())
    return from_dict(data, str(path) if path else "config")


def edited_modules(model: nn.Module, cfg: UltraEditConfig) -> list[str]:
    """The dotted paths of the linear layers a run edits: the config's, else the table's."""
    model_type = model.config.model_type
    if cfg.modules:
        paths = list(cfg.modules)
    elif model_type in EDITED and model_type in ARCHITECTURES:
        n, blocks = count_layers(model), ARCHITECTURES[model_type][0]
        bad = [i for i in cfg.layers if i >= n]
        if bad:
            raise ConfigError(f"layer {bad[0]} is out of range: {model_type} has {n} layers (0..{n - 1})")
        paths = [f"{blocks}.{i}.{inner}" for inner, lo, hi in EDITED[model_type]
                 for i in (sorted(set(cfg.layers)) or range(round(lo * n), round(hi * n) + 1))]
    else:
        raise ConfigError(f"UltraEdit has no table of layers for model type '{model_type}'",
                          hint="list the linear layers to edit under 'modules:' in a --config file")
    for path in paths:
        try:
            module = get_module(model, path)
        except ModelError as exc:
            raise ConfigError(f"field 'modules': {exc}") from None
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"field 'modules': {path} is a {type(module).__name__}, not a linear layer")
    return paths
