"""Open any MODEL argument as a ready model with its side memory attached.

MODEL is an alias, an HF directory, a .gguf file or a directory written by
``wise``; this module is the one place that tells them apart, so every command
loads checkpoints the same way and checks them the same way.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from wisecli.app.checkpoint import PatchedCheckpoint, is_patched, read_checkpoint
from wisecli.methods.wise.config import WiseConfig, load_config
from wisecli.errors import CheckpointError, ConfigError, ModelError
from wisecli.app.manifest import check_state, config_of, subjects_of, targets_of
from wisecli.runtime.hf_remote import attach_layer
from wisecli.methods.locate import FFNTarget, count_layers, get_module, locate_ffn_out
from wisecli.app.models import ALIASES, alias_of, cache_dir, convert_alias, load_model, pick_device, pick_dtype, resolve_base
from wisecli.methods.wise.editor import EditorState
from wisecli.runtime.memory import SideMemoryLayer
from wisecli.runtime.router import RouterConfig


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
    alias: str | None = None     # the built-in alias the base came from, recorded to find it again


def attach(model: nn.Module, target: FFNTarget, tokenizer: Any = None) -> SideMemoryLayer:
    """Swap the FFN output projection for a SideMemoryLayer wrapping it (peft-style), as
    plain transformers does for a patched checkpoint (``hf_remote.attach_layer``)."""
    return attach_layer(model, asdict(target), tokenizer)


def open_model(spec: str | None, *, device: str = "auto", dtype: str = "auto",
               layer: int | None = None, module_path: str | None = None,
               device_map: str | None = None,
               progress: Callable[[str], None] | None = None,
               config_file: str | None = None, base: str | None = None, allow_pickle: bool = False) -> Session:
    """Load MODEL with a side memory attached.

    The memory's layer comes from, in order: ``layer``/``module_path`` (the CLI), the
    checkpoint (a patched model keeps its layer), then ``config_file``'s ``layer`` or
    ``layer_fraction`` over the architecture's preset.  The config file is read here, not
    only by the editor, because the memory is placed before any editing starts.
    """
    t0 = time.perf_counter()
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    ckpt = read_patched(Path(spec), base) if spec and is_patched(Path(spec)) else None
    if ckpt is not None:
        layer, module_path = _checkpoint_layer(ckpt, layer)
        base_dir, origin = ckpt.base_dir, ckpt.manifest["base"].get("origin", str(ckpt.base_dir))
        alias = ckpt.manifest["base"].get("alias")
    elif base is not None:
        raise ConfigError(f"--base {base}: only a patched checkpoint takes a base; {spec or 'default'} is a model")
    else:
        base_dir, origin, alias = resolve_base(spec, progress=progress), spec or "default", alias_of(spec)
    model, tok = load_model(base_dir, dev, dt, device_map=device_map, allow_pickle=allow_pickle)
    if layer is None and module_path is None:
        layer = _config_layer(model, config_file)
    target = locate_ffn_out(model, layer=layer, module_path=module_path)
    mem = attach(model, target, tok)
    if ckpt is not None:
        _restore(mem, ckpt, target)
    blocks = get_module(model, target.layers_path)
    return Session(model, tok, mem, target, blocks, base_dir, origin, ckpt.manifest if ckpt else None,
                   dev, dt, time.perf_counter() - t0, alias)


def read_patched(path: Path, base: str | None = None, verify: bool = True) -> PatchedCheckpoint:
    """A patched checkpoint with its base found: ``base`` (``--base PATH|ALIAS``), the recorded
    path, the recorded alias, or any cached model whose weights hash as recorded."""
    given = resolve_base(base) if base else None
    ckpt = read_checkpoint(path, verify=verify, base=given, elsewhere=_other_bases)
    check_state(ckpt.manifest, ckpt.tensors, str(Path(path) / "wise.safetensors"))
    return ckpt


def _other_bases(meta: dict) -> list[Path]:
    """Where a moved base may be: its recorded alias (converted if it is not cached), then
    every model in wise's cache (their hashes are cached too, so checking them is cheap)."""
    found: list[Path] = []
    if meta.get("alias") in ALIASES:
        try:
            found.append(convert_alias(meta["alias"]))
        except ModelError:
            pass  # its package is not installed here; the hashes may still find a copy
    models = cache_dir() / "models"
    return found + (sorted(p for p in models.iterdir() if p.is_dir() and p not in found) if models.is_dir() else [])


def _checkpoint_layer(ckpt: PatchedCheckpoint, layer: int | None) -> tuple[int, str]:
    saved = ckpt.manifest["target"]
    if layer is not None and layer != saved["layer"]:
        raise ConfigError(f"--layer {layer} differs from the checkpoint's layer {saved['layer']}",
                          hint="a patched checkpoint keeps its layer; omit --layer")
    return saved["layer"], saved["module_path"]


def _config_layer(model: nn.Module, config_file: str | None) -> int:
    """The layer the config (file over the architecture's preset) puts the memory at."""
    n = count_layers(model)
    cfg = load_config(config_file, model.config.model_type)
    if cfg.layer is not None and cfg.layer >= n:
        raise ConfigError(f"{config_file}: field 'layer': {cfg.layer} is out of range: "
                          f"{model.config.model_type} has {n} layers (0..{n - 1})")
    return cfg.layer if cfg.layer is not None else min(n - 1, round(cfg.layer_fraction * n))


def _restore(mem: SideMemoryLayer, ckpt: PatchedCheckpoint, target: FFNTarget) -> None:
    """The checkpoint's memories, subjects and routing settings, into the layer."""
    mems = ckpt.tensors.get("memories")
    want = (target.out_features, target.in_features)
    if mems is None or tuple(mems.shape[1:]) != want:
        got = None if mems is None else tuple(mems.shape)
        raise CheckpointError(f"{ckpt.path}: side memory shape {got} does not fit {target.module_path} {want}")
    mem.load_wise_state(ckpt.tensors, subjects_of(ckpt.manifest), targets_of(ckpt.manifest))
    mem.configure(RouterConfig.from_config(config_of(ckpt.manifest)))


def resolve_config(sess: Session, config_file: str | None, overrides: dict[str, Any]) -> WiseConfig:
    """The run's hyper-parameters: the checkpoint's when continuing, else defaults + preset."""
    if sess.manifest is None:  # the manifest records the layer the memory really sits at
        cfg = load_config(config_file, sess.model.config.model_type, overrides)
        return cfg.replace(layer=sess.target.layer)
    saved = config_of(sess.manifest)
    fixed = {"mode": saved.mode, "layer": sess.target.layer}
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
    if config_file and cfg.layer not in (None, saved.layer, sess.target.layer):
        raise ConfigError(f"{config_file}: field 'layer': {cfg.layer} differs from the checkpoint's "
                          f"layer {sess.target.layer}", hint="a patched checkpoint keeps its layer")
    if sess.mem.n_memories and not sess.mem.edit_keys.numel():
        raise CheckpointError(f"{sess.origin}: written before router keys; new edits would re-measure its "
                              "thresholds without its earlier edits", hint="re-create it from the base model")
    return cfg.replace(layer=sess.target.layer)


def editor_state(sess: Session) -> EditorState:
    return EditorState.from_dict(sess.manifest.get("editor", {})) if sess.manifest else EditorState()
