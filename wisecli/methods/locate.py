"""Which module WISE edits: the FFN output projection at one layer, and how to swap it.

WISE edits one FFN output projection (``down_proj``, ``fc_out``, ``c_proj``, ...)
at one layer.  Which module that is comes from a small table keyed by
``config.model_type`` (never by the model's name), and what the module *is*
(``nn.Linear`` or GPT-2's transposed ``Conv1D``) from ``isinstance``.
Anything the table does not cover can be named with a dotted ``module_path``.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from wisecli.methods.wise.config import WiseConfig
from wisecli.errors import ModelError

__all__ = ["ARCHITECTURES", "DEFAULT_LAYER_FRACTION", "FFNTarget", "default_layer", "count_layers",
           "locate_ffn_out", "get_module", "set_module"]

# ------------------------------------------------------------ FFN location

# model_type -> (ModuleList of decoder blocks, FFN output projection inside a block).
# MoE models (mixtral, qwen2_moe, ...) are left out: their FFN is many experts.
ARCHITECTURES: dict[str, tuple[str, str]] = {
    **{t: ("model.layers", "mlp.down_proj") for t in (
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
        "olmo", "olmo2", "stablelm", "granite", "cohere", "smollm3")},
    "gemma3": ("model.language_model.layers", "mlp.down_proj"),  # multimodal: text tower
    "phi": ("model.layers", "mlp.fc2"),
    "starcoder2": ("model.layers", "mlp.c_proj"),
    "gpt2": ("transformer.h", "mlp.c_proj"),
    "gpt_bigcode": ("transformer.h", "mlp.c_proj"),
    "gptj": ("transformer.h", "mlp.fc_out"),
    "gpt_neox": ("gpt_neox.layers", "mlp.dense_4h_to_h"),
    "falcon": ("transformer.h", "mlp.dense_4h_to_h"),
    "bloom": ("transformer.h", "mlp.dense_4h_to_h"),
    "opt": ("model.decoder.layers", "fc2"),
}
DEFAULT_LAYER_FRACTION = WiseConfig.layer_fraction
_MODULE_PATH_HINT = ("pass --module-path <dotted path of an FFN output projection, "
                     "e.g. model.layers.20.mlp.down_proj>")


@dataclass(frozen=True)
class FFNTarget:
    """Where the side memory goes.  ``kind`` says how to read the weight:
    "linear" stores (out, in); "conv1d" (GPT-2) stores (in, out), transposed."""

    model_type: str
    layers_path: str
    n_layers: int
    layer: int
    module_path: str
    kind: str
    in_features: int
    out_features: int

    @property
    def where(self) -> str:
        """The edited module, as messages name it."""
        return self.module_path

    def describe(self) -> dict:
        """The manifest's ``target``: what a later run and plain transformers need to find it."""
        return {"module_path": self.module_path, "layer": self.layer, "n_layers": self.n_layers,
                "kind": self.kind, "in_features": self.in_features, "out_features": self.out_features}


def default_layer(n_layers: int) -> int:
    """The layer WISE edits by default: about 0.8 of the depth (30 layers -> 24)."""
    return min(max(round(DEFAULT_LAYER_FRACTION * n_layers), 0), max(n_layers - 1, 0))


def count_layers(model: nn.Module) -> int:
    """The number of decoder blocks of a model whose architecture the table knows."""
    model_type = str(getattr(getattr(model, "config", None), "model_type", "unknown"))
    if model_type not in ARCHITECTURES:
        raise ModelError(f"unsupported architecture '{model_type}'", hint=_MODULE_PATH_HINT)
    return len(_module_list(model, ARCHITECTURES[model_type][0]))


def locate_ffn_out(
    model: nn.Module, layer: int | None = None, module_path: str | None = None
) -> FFNTarget:
    """Find the FFN output projection at ``layer`` (default: ``default_layer``).

    ``module_path`` (a full dotted path through a numbered block) overrides the
    table, for architectures it does not cover.
    """
    model_type = str(getattr(getattr(model, "config", None), "model_type", "unknown"))
    if module_path:
        layers_path, idx, n_layers = _split_block_path(model, module_path)
        if layer is not None and layer != idx:
            raise ModelError(f"--layer {layer} contradicts --module-path {module_path} (layer {idx})")
        layer = idx
    else:
        n_layers = count_layers(model)
        layers_path, inner = ARCHITECTURES[model_type]
        layer = default_layer(n_layers) if layer is None else layer
        if not 0 <= layer < n_layers:
            raise ModelError(f"--layer {layer} is out of range: {model_type} has "
                             f"{n_layers} layers (0..{n_layers - 1})")
        module_path = f"{layers_path}.{layer}.{inner}"
    kind, in_f, out_f = _linear_kind(get_module(model, module_path), module_path)
    return FFNTarget(model_type, layers_path, n_layers, layer, module_path, kind, in_f, out_f)


def _split_block_path(model: nn.Module, module_path: str) -> tuple[str, int, int]:
    """Split ``a.b.12.mlp.proj`` into ('a.b', 12, len(a.b)): the block list and index."""
    parts = module_path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            layers_path = ".".join(parts[:i])
            blocks = _module_list(model, layers_path)
            return layers_path, int(part), len(blocks)
    raise ModelError(f"--module-path {module_path} does not pass through a numbered block",
                     hint=_MODULE_PATH_HINT)


def _module_list(model: nn.Module, dotted: str) -> nn.ModuleList:
    """The decoder blocks; anything but a ModuleList means the table is wrong for this model."""
    blocks = get_module(model, dotted)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise ModelError(f"{dotted} is a {type(blocks).__name__}, not a list of layers",
                         hint=_MODULE_PATH_HINT)
    return blocks


def _linear_kind(module: nn.Module, dotted: str) -> tuple[str, int, int]:
    """("linear"|"conv1d", in_features, out_features), decided by type, never by name.

    A layer already wrapped by wise (peft-style, keeping ``base_layer``) is
    described by the layer it wraps.
    """
    from transformers.pytorch_utils import Conv1D

    base = getattr(module, "base_layer", module)
    if isinstance(base, nn.Linear):
        return "linear", base.in_features, base.out_features
    if isinstance(base, Conv1D):  # weight is (in, out): GPT-2 computes x @ W + b
        in_f, out_f = base.weight.shape
        return "conv1d", int(in_f), int(out_f)
    raise ModelError(f"{dotted} is a {type(base).__name__}, not a Linear or Conv1D layer",
                     hint=_MODULE_PATH_HINT)


# ----------------------------------------------------------- module surgery


def get_module(root: nn.Module, dotted: str) -> nn.Module:
    """The submodule at a dotted path (list indices as numbers); ModelError names what is missing."""
    module = root
    for i, part in enumerate(dotted.split(".") if dotted else []):
        try:
            if isinstance(module, (nn.ModuleList, nn.Sequential)) and part.isdigit():
                module = module[int(part)]
            else:
                module = getattr(module, part)
        except (AttributeError, IndexError, LookupError) as e:
            where = ".".join(dotted.split(".")[:i]) or type(root).__name__
            raise ModelError(f"module '{dotted}' not found: {where} has no '{part}'") from e
        if not isinstance(module, nn.Module):
            raise ModelError(f"'{dotted}' is a {type(module).__name__}, not a module")
    return module


def set_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    """Replace the submodule at ``dotted`` (it must exist) by ``new``, on its parent."""
    parent_path, _, child = dotted.rpartition(".")
    if not child:
        raise ModelError("set_module needs a non-empty dotted path")
    get_module(root, dotted)  # must exist: we replace, never add
    parent = get_module(root, parent_path)
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)
