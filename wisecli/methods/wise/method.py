"""WISE behind the method seam: a side memory at one FFN output projection, its router, and
the editor that trains shards into it (``editor.py``).

Everything here is what the application would otherwise have to know about WISE: where the
memory goes (the architecture table's FFN output projection, at the config's layer), how
the config of a continued run is pinned to the checkpoint's, and how a checkpoint's tensors
and edit texts are restored into the layer.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch.nn as nn

from wisecli.errors import CheckpointError, ConfigError
from wisecli.methods.base import Method
from wisecli.methods.locate import FFNTarget, count_layers, locate_ffn_out
from wisecli.methods.wise.config import WiseConfig, from_dict, load_config
from wisecli.methods.wise.editor import EditorState, WiseEditor
from wisecli.methods.wise.state import check_state
from wisecli.runtime.hf_remote import attach_layer
from wisecli.runtime.memory import SideMemoryLayer
from wisecli.runtime.stored import runtime_state
from wisecli.runtime.router import RouterConfig


def config_of(manifest: dict) -> WiseConfig:
    return from_dict(manifest["config"], "wise.json")


def targets_of(manifest: dict) -> list[tuple[int, str]]:
    """(memory, new target) per edit, in edit order: what generation follows while it answers."""
    return [(int(e["memory"]), e["target_new"]) for e in manifest.get("edits", []) if e.get("memory") is not None]


def subjects_of(manifest: dict) -> list[tuple[int, str | None]]:
    """(memory, subject or None) per edit, in edit order: the subject gate's state."""
    return [(int(e["memory"]), e.get("subject")) for e in manifest.get("edits", [])
            if e.get("memory") is not None]


def locate(model: nn.Module, layer: int | tuple[int, ...] | None, module_path: str | None,
           config_file: str | None, saved: dict | None = None) -> FFNTarget:
    """The FFN output projection the memory replaces: a checkpoint's (``saved``), else the
    CLI's, else the config's layer."""
    if isinstance(layer, tuple):
        if len(layer) != 1:
            raise ConfigError(f"--layer given {len(layer)} times: WISE's side memory sits at one layer")
        layer = layer[0]
    if saved is not None:
        if layer is not None and layer != saved["layer"]:
            raise ConfigError(f"--layer {layer} differs from the checkpoint's layer {saved['layer']}",
                              hint="a patched checkpoint keeps its layer; omit --layer")
        layer, module_path = saved["layer"], saved["module_path"]
    if layer is None and module_path is None:
        layer = _config_layer(model, config_file)
    return locate_ffn_out(model, layer=layer, module_path=module_path)


def _config_layer(model: nn.Module, config_file: str | None) -> int:
    """The layer the config (file over the architecture's preset) puts the memory at."""
    n = count_layers(model)
    cfg = load_config(config_file, model.config.model_type)
    if cfg.layer is not None and cfg.layer >= n:
        raise ConfigError(f"{config_file}: field 'layer': {cfg.layer} is out of range: "
                          f"{model.config.model_type} has {n} layers (0..{n - 1})")
    return cfg.layer if cfg.layer is not None else min(n - 1, round(cfg.layer_fraction * n))


def attach(model: nn.Module, target: dict | FFNTarget, tokenizer: Any = None) -> SideMemoryLayer:
    """Swap the FFN output projection for a SideMemoryLayer wrapping it (peft-style), as
    plain transformers does for a patched checkpoint (``hf_remote.attach_layer``)."""
    return attach_layer(model, asdict(target) if isinstance(target, FFNTarget) else target, tokenizer)


def restore(mem: SideMemoryLayer, tensors: dict, manifest: dict) -> None:
    """The checkpoint's memories, subjects, targets and routing settings, into the layer."""
    mems = runtime_state(tensors).get("memories")
    want = (mem.out_features, mem.in_features)
    if mems is None or tuple(mems.shape[1:]) != want:
        got = None if mems is None else tuple(mems.shape)
        raise CheckpointError(f"side memory shape {got} does not fit {manifest['target']['module_path']} {want}")
    mem.load_wise_state(tensors, subjects_of(manifest), targets_of(manifest))
    mem.configure(RouterConfig.from_config(config_of(manifest)))


def resolve_config(model: nn.Module, mem: SideMemoryLayer, manifest: dict | None, layer: int,
                   config_file: str | None, overrides: dict[str, Any]) -> WiseConfig:
    """The run's hyper-parameters: the checkpoint's when continuing, else defaults + preset."""
    if manifest is None:  # the manifest records the layer the memory really sits at
        return load_config(config_file, model.config.model_type, overrides).replace(layer=layer)
    saved = config_of(manifest)
    fixed = {"mode": saved.mode, "layer": layer}
    for key, value in overrides.items():
        if key in fixed and value is not None and value != fixed[key]:
            raise ConfigError(f"--{key} {value} differs from the checkpoint's {fixed[key]}",
                              hint="side memories of one checkpoint share one mode and layer")
    cfg = load_config(config_file, None, overrides, base=saved.to_dict()) if config_file \
        else saved.replace(**overrides)
    if cfg.mode != saved.mode:
        raise ConfigError(f"config mode '{cfg.mode}' differs from the checkpoint's '{saved.mode}'")
    # only a layer the config file itself names (older manifests may record a layer the
    # memory never sat at: a config's layer used to be ignored)
    if config_file and cfg.layer not in (None, saved.layer, layer):
        raise ConfigError(f"{config_file}: field 'layer': {cfg.layer} differs from the checkpoint's "
                          f"layer {layer}", hint="a patched checkpoint keeps its layer")
    if mem.n_memories and not mem.edit_keys.numel():
        raise CheckpointError(f"{manifest['base'].get('origin', 'the checkpoint')}: written before router keys; new "
                              "edits would re-measure its thresholds without its earlier edits",
                              hint="re-create it from the base model")
    return cfg.replace(layer=layer)


def editor(model: nn.Module, tokenizer: Any, mem: SideMemoryLayer, blocks: nn.ModuleList, layer: int,
           cfg: WiseConfig, state: dict | None) -> WiseEditor:
    return WiseEditor(model, tokenizer, mem, blocks, layer, cfg, EditorState.from_dict(state or {}))


def summary(mem: SideMemoryLayer) -> dict[str, Any]:
    """A readable copy of the router's tensors."""
    return {"scale": float(mem.scale), "thresholds": mem.thresholds.tolist(),
            "min_edit_scores": mem.min_edit_scores.tolist(), "n_memories": mem.n_memories}


WISE = Method(name="wise", load_config=load_config, config_from_dict=from_dict,
              resolve_config=resolve_config, locate=locate, attach=attach, check_state=check_state,
              restore=restore, editor=editor, summary=summary)
