"""Load a checkpoint, choose device and dtype, and find the FFN output projection to edit.

WISE edits one FFN output projection (``down_proj``, ``fc_out``, ``c_proj``, ...)
at one layer.  Which module that is comes from a small table keyed by
``config.model_type`` (never by the model's name), and what the module *is*
(``nn.Linear`` or GPT-2's transposed ``Conv1D``) from ``isinstance``.
Anything the table does not cover can be named with a dotted ``module_path``.

Alias and GGUF conversion, and the cache, live in ``wisecli.aliases``.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from wisecli.aliases import (
    ALIASES,
    DEFAULT_MODEL,
    aliases_hint,
    cache_dir,
    convert_alias,
    convert_gguf,
    is_gguf,
    short_message,
)
from wisecli.config import WiseConfig
from wisecli.errors import DeviceError, ModelError, WiseError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "ALIASES", "DEFAULT_MODEL", "ARCHITECTURES", "DEFAULT_LAYER_FRACTION", "FFNTarget",
    "cache_dir", "resolve_base", "alias_of", "pick_device", "pick_dtype", "load_model",
    "default_layer", "count_layers", "locate_ffn_out", "get_module", "set_module", "describe_model",
]

# ---------------------------------------------------------------- checkpoints


def resolve_base(spec: str | None, progress: Callable[[str], None] | None = None) -> Path:
    """Turn MODEL (alias, .gguf file or HF directory) into a Hugging Face checkpoint dir.

    An existing path wins over an alias of the same name, as with
    ``from_pretrained``.  GGUFs and aliases are converted once and cached.
    """
    name = DEFAULT_MODEL if spec in (None, "", "default") else str(spec)
    path = Path(name).expanduser()
    if path.exists():
        return _resolve_path(path, progress)
    if name in ALIASES:
        return convert_alias(name, progress)
    if _looks_like_path(name):
        hint = None
        if name.count("/") == 1 and not name.startswith((".", "/", "~")):
            hint = "wise works offline: download a hub model first (hf download ...) and pass its directory"
        raise ModelError(f"{name}: no such file or directory", hint=hint)
    raise ModelError(
        f"unknown model '{name}': not a built-in alias nor an existing path", hint=aliases_hint()
    )


def alias_of(spec: str | None) -> str | None:
    """The built-in alias MODEL names (``default`` included), or None for a path."""
    name = DEFAULT_MODEL if spec in (None, "", "default") else str(spec)
    return name if name in ALIASES and not Path(name).expanduser().exists() else None


def _resolve_path(path: Path, progress: Callable[[str], None] | None) -> Path:
    """An existing file must be a GGUF; an existing directory must hold config.json."""
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        raise ModelError(
            f"{path}: not a Hugging Face checkpoint directory (no config.json)",
            hint="pass a directory with config.json and weights, a .gguf file, or an alias",
        )
    if not is_gguf(path):
        what = "not a GGUF model file" if path.suffix.lower() == ".gguf" else "not a model"
        raise ModelError(f"{path}: {what}", hint=aliases_hint())
    return convert_gguf(path, progress)


def _looks_like_path(name: str) -> bool:
    """Whether a missing MODEL was meant as a path (so say 'no such file'), not a name."""
    return "/" in name or "\\" in name or name.startswith((".", "~")) or name.endswith(".gguf")


def load_model(
    model_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    device_map: str | None = None,
    allow_pickle: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an HF checkpoint for inference and editing: eval mode, every base weight frozen.

    The tokenizer pads on the left so that a batch of prompts ends on real
    tokens, which is where generation and the next-token loss read from.  Weights are read
    from safetensors only, unless ``allow_pickle``: unpickling a file can run its code.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not allow_pickle:
        _refuse_pickle(Path(model_dir))

    if device_map in (None, ""):
        placement: str | dict = {"": device}
    elif device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        placement = device_map
    else:
        raise DeviceError(f"unknown --device-map '{device_map}'", hint="use auto (or omit it)")
    try:
        # Never code from a checkpoint: a patched directory's config only nests the base's.
        given = {"config": config} if (config := _patched_base_config(Path(model_dir))) else {}
        tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False, **given)
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=dtype, low_cpu_mem_usage=True, device_map=placement,
            trust_remote_code=False, use_safetensors=None if allow_pickle else True, **given
        )
    except torch.cuda.OutOfMemoryError as e:
        raise DeviceError(f"{model_dir}: out of GPU memory while loading",
                          hint="try --dtype float16, --device-map auto or --device cpu") from e
    except Exception as e:  # loaders raise OSError, ValueError, KeyError, ... for bad dirs
        raise ModelError(f"{model_dir}: cannot load the model ({short_message(e)})") from e
    model.eval()
    model.requires_grad_(False)
    _set_padding(model, tok, model_dir)
    return model, tok


def _refuse_pickle(model_dir: Path) -> None:
    """A base whose weights come only as pickles (``pytorch_model.bin``) is refused by name."""
    safe = [p for p in model_dir.glob("*.safetensors") if p.name != "wise.safetensors"]
    pickled = sorted(p.name for p in model_dir.glob("*.bin"))
    if pickled and not safe:
        raise ModelError(f"{model_dir}: its weights are pickled ({pickled[0]}); wise reads only safetensors",
                         hint=f"convert once: python -c \"from transformers import AutoModelForCausalLM as M; "
                              f"M.from_pretrained('{model_dir}').save_pretrained('{model_dir}-st')\", "
                              "or pass --allow-pickle if you trust the file")


def _patched_base_config(model_dir: Path):
    """The base architecture's config when ``model_dir`` holds a patched config.json, else
    None (a plain checkpoint: transformers reads its config itself, and reports a bad one)."""
    from wisecli.hf_remote import PATCHED_MODEL_TYPE, base_config_of
    try:
        model_type = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return base_config_of(str(model_dir)) if model_type == PATCHED_MODEL_TYPE else None


def _set_padding(model: PreTrainedModel, tok: PreTrainedTokenizerBase, model_dir: Path) -> None:
    """Give the tokenizer a pad token (EOS, as is usual for decoder-only models) and pad left."""
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError(f"{model_dir}: the tokenizer has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tok.pad_token_id  # else generate() warns on every call


# ------------------------------------------------------------- device, dtype

_DEVICE_HINT = "valid values: auto, cpu, cuda, cuda:N (N = GPU index)"
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def pick_device(spec: str = "auto") -> torch.device:
    """auto -> the first GPU when there is one, else CPU; cuda[:N] only when it exists."""
    s = (spec or "auto").strip().lower()
    if s == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if s == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", s)
    if m is None:
        raise DeviceError(f"unknown device '{spec}'", hint=_DEVICE_HINT)
    if not torch.cuda.is_available():
        raise DeviceError(
            "CUDA was requested but torch.cuda.is_available() is False on this machine",
            hint="use --device cpu or auto",
        )
    index, count = int(m.group(1) or 0), torch.cuda.device_count()
    if index >= count:
        raise DeviceError(
            f"device '{spec}' does not exist: this machine has {count} GPU(s) (cuda:0..cuda:{count - 1})",
            hint=_DEVICE_HINT,
        )
    return torch.device("cuda", index)


def pick_dtype(spec: str, device: torch.device) -> torch.dtype:
    """auto -> float32 on CPU, bfloat16 on a GPU that supports it, else float16.

    Half precision on CPU is allowed: slow, but it is what the user asked for.
    """
    s = (spec or "auto").strip().lower()
    if s == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if s not in _DTYPES:
        raise WiseError(f"unknown dtype '{spec}'", hint="valid values: auto, float32, bfloat16, float16")
    dtype = _DTYPES[s]
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"{device} does not support bfloat16", hint="use --dtype float16")
    return dtype


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


# --------------------------------------------------------------- reporting


def describe_model(model: nn.Module) -> dict:
    """A small JSON-able summary for reports and manifests."""
    config = getattr(model, "config", None)
    model_type = str(getattr(config, "model_type", "unknown"))
    params = list(model.parameters())
    devices = sorted({str(p.device) for p in params})
    return {
        "model_type": model_type,
        "n_layers": _n_layers(model, config, model_type),
        "n_params": sum(p.numel() for p in params),
        "dtype": str(params[0].dtype).removeprefix("torch.") if params else None,
        "device": ",".join(devices) if devices else None,
    }


def _n_layers(model: nn.Module, config: object, model_type: str) -> int | None:
    """Depth from the block list when the architecture is known, else from the config."""
    if model_type in ARCHITECTURES:
        try:
            return len(_module_list(model, ARCHITECTURES[model_type][0]))
        except ModelError:
            pass
    for cfg in (config, getattr(config, "text_config", None)):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            value = getattr(cfg, key, None)
            if isinstance(value, int):
                return value
    return None

