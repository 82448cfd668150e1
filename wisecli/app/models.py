"""Load a checkpoint, and choose its device and dtype.

Alias and GGUF conversion, and the cache, live in ``wisecli.app.aliases``; which module is
edited, in ``wisecli.methods.locate``.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from wisecli.app.aliases import (
    ALIASES,
    DEFAULT_MODEL,
    aliases_hint,
    cache_dir,
    convert_alias,
    convert_gguf,
    is_gguf,
    short_message,
)
from wisecli.errors import DeviceError, ModelError, WiseError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["ALIASES", "DEFAULT_MODEL", "cache_dir", "resolve_base", "alias_of", "pick_device", "pick_dtype",
           "load_model"]

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
    from wisecli.runtime.hf_remote import PATCHED_MODEL_TYPE, base_config_of
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
