"""Plain transformers loading of a patched checkpoint: the code behind ``modeling_wise.py``.

A patched directory's ``config.json`` names the architecture ``WisePatchedForCausalLM`` with
an ``auto_map`` into ``modeling_wise.py``, written beside the weights.  So
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` gives the edited model,
routed exactly as ``wise`` routes it, and a plain ``from_pretrained(dir)`` stops with
transformers' own error instead of silently giving the unedited base.

``modeling_wise.py`` is this module bundled with the rest of ``wisecli/runtime/`` (the
maths, subject matching, the router, generation state, the cache refresh, the memory layer;
see ``app/bundle.py``), so it needs only torch, transformers and safetensors: the same
code, not a second implementation.
Everything here depends on nothing else, because it runs without ``wisecli`` installed.
"""
from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any

import safetensors.torch
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from .memory import SideMemoryLayer, install
from .router import RouterConfig

PATCHED_MODEL_TYPE = "wise_patched"
PATCHED_ARCHITECTURE = "WisePatchedForCausalLM"
MODELING_FILE = "modeling_wise.py"
READS_FORMAT = 7  # the manifest format this code reads (written with it, so always the same)
# What a caller of from_pretrained may set that concerns the base model's loading.
_PASSED_ON = ("dtype", "torch_dtype", "device_map", "low_cpu_mem_usage", "attn_implementation")


class WisePatchedConfig(PretrainedConfig):
    """config.json of a patched checkpoint: the base model's config, nested, so that nothing
    reads it as the base architecture's and loads the weights without their side memory."""

    model_type = PATCHED_MODEL_TYPE

    def __init__(self, base_config: dict | None = None, **kwargs: Any) -> None:
        self.base_config = dict(base_config or {})
        super().__init__(**kwargs)


class WisePatchedForCausalLM(PreTrainedModel):
    """Loads as the base architecture's model with its side memory attached (never an
    instance of this class: it only stands in for the patched checkpoint in ``auto_map``)."""

    config_class = WisePatchedConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any,
                        **kwargs: Any) -> PreTrainedModel:
        return load_patched(str(pretrained_model_name_or_path),
                            **{k: v for k, v in kwargs.items() if k in _PASSED_ON and v is not None})


def base_config_of(path: str) -> PretrainedConfig:
    """The base architecture's config, from a patched directory's nested ``base_config``."""
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        data = json.load(f)
    base = dict(data.get("base_config") or {})
    if data.get("model_type") != PATCHED_MODEL_TYPE or "model_type" not in base:
        raise ValueError(f"{path}: config.json is not a patched checkpoint's (no base_config)")
    return AutoConfig.for_model(base.pop("model_type"), **base)


def load_patched(path: str, **load_kwargs: Any) -> PreTrainedModel:
    """The base model, loaded with transformers from the weights the manifest names, with
    the checkpoint's side memory, subjects and routing settings attached."""
    with open(os.path.join(path, "wise.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format_version") != READS_FORMAT:
        raise ValueError(f"{path}: wise.json has format_version {manifest.get('format_version')!r}; this "
                         f"{MODELING_FILE} reads {READS_FORMAT}: open it with the wise that wrote it")
    if manifest.get("method") != "wise":
        raise ValueError(f"{path}: wise.json names the method {manifest.get('method')!r}; this "
                         f"{MODELING_FILE} attaches 'wise' side memories")
    base, config = manifest["base"], base_config_of(path)
    weights = path if base["embedded"] else os.path.join(path, base["path"])
    model = AutoModelForCausalLM.from_pretrained(weights, config=config, **load_kwargs)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, config=config)
    layer = attach_layer(model, manifest["target"], tokenizer)
    tensors = safetensors.torch.load_file(os.path.join(path, "wise.safetensors"))
    placed = [e for e in manifest["edits"] if e.get("memory") is not None]
    layer.load_wise_state(tensors, [(int(e["memory"]), e.get("subject")) for e in placed],
                          [(int(e["memory"]), e["target_new"]) for e in placed])
    layer.configure(RouterConfig.from_config(SimpleNamespace(**manifest["config"])))
    model.save_pretrained = _refuse_save  # its state dict is not a loadable checkpoint
    return model


def attach_layer(model: torch.nn.Module, target: dict, tokenizer: Any) -> SideMemoryLayer:
    """Swap the FFN output projection at ``target['module_path']`` for a side-memory layer."""
    parent_path, _, child = target["module_path"].rpartition(".")
    parent = model.get_submodule(parent_path)
    layer = SideMemoryLayer(getattr(parent, child), target["kind"], target["in_features"],
                            target["out_features"], tokenizer=tokenizer)
    setattr(parent, child, layer)
    install(model, layer)
    return layer


def _refuse_save(*_args: Any, **_kwargs: Any) -> None:
    raise NotImplementedError(
        "a model with a wise side memory cannot be saved with save_pretrained (its state dict "
        "holds the side memory inside the base weights' names); patched checkpoints are written "
        "by `wise edit` or wisecli.edit(), and load with from_pretrained(dir, trust_remote_code=True)")
