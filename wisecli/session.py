"""Open any MODEL argument as a ready model with its side memory attached.

MODEL is an alias, an HF directory, a .gguf file or a directory written by
``wise``; this module is the one place that tells them apart, so every command
loads checkpoints the same way and checks them the same way.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from . import __version__
from .checkpoint import is_patched, read_checkpoint
from .config import WiseConfig, from_dict, load_config
from .errors import CheckpointError, ConfigError
from .models import FFNTarget, get_module, load_model, locate_ffn_out, pick_device, pick_dtype, resolve_base, set_module
from .wise.editor import EditorState
from .wise.memory import SideMemoryLayer, install


@dataclass
class Session:
    model: nn.Module
    tokenizer: Any
    mem: SideMemoryLayer
    target: FFNTarget
    blocks: nn.ModuleList
    base_dir: Path
    origin: str
    manifest: dict | None        # None for an unedited base
    device: torch.device
    dtype: torch.dtype
    load_seconds: float


def attach(model: nn.Module, target: FFNTarget) -> SideMemoryLayer:
    """Swap the FFN output projection for a SideMemoryLayer wrapping it (peft-style)."""
    base = get_module(model, target.module_path)
    mem = SideMemoryLayer(base, target.kind, target.in_features, target.out_features)
    set_module(model, target.module_path, mem)
    install(model, mem)
    return mem


def open_model(spec: str | None, *, device: str = "auto", dtype: str = "auto",
               layer: int | None = None, module_path: str | None = None,
               device_map: str | None = None,
               progress: Callable[[str], None] | None = None,
               config_file: str | None = None) -> Session:
    """Load MODEL with a side memory attached.

    The memory's layer comes from, in order: ``layer``/``module_path`` (the CLI), the
    checkpoint (a patched model keeps its layer), then ``config_file``'s ``layer`` or
    ``layer_fraction`` over the architecture's preset.  The config file is read here, not
    only by the editor, because the memory is placed before any editing starts.
    """
    t0 = time.perf_counter()
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    manifest, tensors = None, None
    if spec and is_patched(Path(spec)):
        ckpt = read_checkpoint(Path(spec))
        manifest, tensors, base_dir = ckpt.manifest, ckpt.tensors, ckpt.base_dir
        origin = manifest.get("base", {}).get("origin", str(base_dir))
        saved = manifest["target"]
        if layer is not None and layer != saved["layer"]:
            raise ConfigError(f"--layer {layer} differs from the checkpoint's layer {saved['layer']}",
                              hint="a patched checkpoint keeps its layer; omit --layer")
        layer, module_path = saved["layer"], saved["module_path"]
    else:
        base_dir = resolve_base(spec, progress=progress)
        origin = spec or "default"
    model, tok = load_model(base_dir, dev, dt, device_map=device_map)
    if layer is None and module_path is None:
        # Per-architecture depth (config presets); locate_ffn_out names unsupported models.
        n = locate_ffn_out(model).n_layers
        cfg = load_config(config_file, model.config.model_type)
        if cfg.layer is not None and cfg.layer >= n:
            raise ConfigError(f"{config_file}: field 'layer': {cfg.layer} is out of range: "
                              f"{model.config.model_type} has {n} layers (0..{n - 1})")
        layer = cfg.layer if cfg.layer is not None else min(n - 1, round(cfg.layer_fraction * n))
    target = locate_ffn_out(model, layer=layer, module_path=module_path)
    mem = attach(model, target)
    mem.detokenize = lambda ids: tok.decode(ids, skip_special_tokens=True)
    if tensors is not None:
        _check_state(tensors, target, Path(spec))
        mem.load_wise_state(tensors)
        mem.hold = bool(manifest["config"].get("hold_routing", True))
        mem.pooling = manifest["config"].get("score_pooling", "mean")
        mem.key_gate = float(manifest["config"].get("key_gate", 0.0))
        mem.route_by = manifest["config"].get("route_by", "closest")  # older checkpoints
        mem.coverage_gate = float(manifest["config"].get("coverage_gate", 0.0))
        # Checkpoints written before the subject gate keep routing by keys alone.
        mem.subject_gate = bool(manifest["config"].get("subject_gate", False))
        mem.edit_subjects = [(int(e["memory"]), e.get("subject")) for e in manifest.get("edits", [])
                             if e.get("memory") is not None]
    blocks = get_module(model, target.layers_path)
    return Session(model, tok, mem, target, blocks, base_dir, origin, manifest, dev, dt,
                   time.perf_counter() - t0)


def _check_state(tensors: dict[str, torch.Tensor], target: FFNTarget, path: Path) -> None:
    mems = tensors.get("memories")
    want = (target.out_features, target.in_features)
    if mems is None or tuple(mems.shape[1:]) != want:
        got = None if mems is None else tuple(mems.shape)
        raise CheckpointError(f"{path}: side memory shape {got} does not fit {target.module_path} {want}")


def session_config(sess: Session, config_file: str | None, overrides: dict[str, Any]) -> WiseConfig:
    """The run's hyper-parameters: the checkpoint's when continuing, else defaults + preset."""
    if sess.manifest is None:  # the manifest records the layer the memory really sits at
        cfg = load_config(config_file, sess.model.config.model_type, overrides)
        return cfg.replace(layer=sess.target.layer)
    saved = from_dict(sess.manifest["config"], "wise.json")
    fixed = {"mode": saved.mode, "layer": sess.target.layer}
    for key, value in {**overrides}.items():
        if key in fixed and value is not None and value != fixed[key]:
            raise ConfigError(f"--{key} {value} differs from the checkpoint's {fixed[key]}",
                              hint="side memories of one checkpoint share one mode and layer")
    cfg = load_config(config_file, None, overrides, base=saved.to_dict()) if config_file \
        else saved.replace(**overrides)
    if cfg.mode != saved.mode:
        raise ConfigError(f"config mode '{cfg.mode}' differs from the checkpoint's '{saved.mode}'")
    # only a layer the config file itself names (older manifests may record a layer the
    # memory never sat at: a config's layer used to be ignored)
    if config_file and cfg.layer not in (None, saved.layer, sess.target.layer):
        raise ConfigError(f"{config_file}: field 'layer': {cfg.layer} differs from the checkpoint's "
                          f"layer {sess.target.layer}", hint="a patched checkpoint keeps its layer")
    return cfg.replace(layer=sess.target.layer)


def editor_state(sess: Session) -> EditorState:
    return EditorState.from_dict(sess.manifest.get("editor", {})) if sess.manifest else EditorState()


def base_manifest(sess: Session) -> dict:
    """Manifest keys describing the tool, the base model and the edited module."""
    t = sess.target
    prior = (sess.manifest or {}).get("base", {})
    return {
        "tool": {"name": "wise", "version": __version__, "torch": torch.__version__},
        "base": {"origin": prior.get("origin", sess.origin), "model_type": t.model_type},
        "target": {"module_path": t.module_path, "layer": t.layer, "n_layers": t.n_layers,
                   "kind": t.kind, "in_features": t.in_features, "out_features": t.out_features},
    }
