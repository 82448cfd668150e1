"""Open any MODEL argument as a ready model with its method's runtime layer attached.

MODEL is an alias, an HF directory, a .gguf file or a directory written by
``wise``; this module is the one place that tells them apart, so every command
loads checkpoints the same way and checks them the same way.  What is attached, and how a
checkpoint's state is restored, is the method's (``wisecli.methods``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from wisecli import methods
from wisecli.app.checkpoint import PatchedCheckpoint, is_patched, read_checkpoint
from wisecli.app.models import ALIASES, alias_of, cache_dir, convert_alias, load_model, pick_device, pick_dtype, resolve_base
from wisecli.errors import CheckpointError, ConfigError, ModelError
from wisecli.methods.locate import get_module


@dataclass
class Session:
    model: nn.Module
    tokenizer: Any
    mem: Any                     # the method's runtime layer (WISE: a SideMemoryLayer)
    target: Any                  # where the method edits (WISE: an FFNTarget)
    blocks: nn.ModuleList
    base_dir: Path
    origin: str
    manifest: dict | None        # None for an unedited base
    device: torch.device
    dtype: torch.dtype
    load_seconds: float
    alias: str | None = None     # the built-in alias the base came from, recorded to find it again
    method: str = methods.DEFAULT

    def resolve_config(self, config_file: str | None, overrides: dict[str, Any]) -> Any:
        """The run's hyper-parameters: the checkpoint's when continuing, else defaults + preset."""
        return methods.get(self.method).resolve_config(self.model, self.mem, self.manifest, self.target.layer,
                                                       config_file, overrides)


def open_model(spec: str | None, *, device: str = "auto", dtype: str = "auto",
               layer: int | tuple[int, ...] | None = None, module_path: str | None = None,
               device_map: str | None = None,
               progress: Callable[[str], None] | None = None,
               config_file: str | None = None, base: str | None = None, allow_pickle: bool = False,
               method: str | None = None) -> Session:
    """Load MODEL with its method's layer attached (a checkpoint's method, else ``method``).

    The layer comes from, in order: ``layer``/``module_path`` (the CLI), the checkpoint (a
    patched model keeps its layer), then the method's config (``config_file`` over the
    architecture's preset).  The config file is read here, not only by the editor, because
    the layer is placed before any editing starts.
    """
    t0 = time.perf_counter()
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    ckpt = read_patched(Path(spec), base) if spec and is_patched(Path(spec)) else None
    if ckpt is not None:
        base_dir, origin = ckpt.base_dir, ckpt.manifest["base"].get("origin", str(ckpt.base_dir))
        alias = ckpt.manifest["base"].get("alias")
        method = _checkpoint_method(ckpt, method)
    elif base is not None:
        raise ConfigError(f"--base {base}: only a patched checkpoint takes a base; {spec or 'default'} is a model")
    else:
        base_dir, origin, alias = resolve_base(spec, progress=progress), spec or "default", alias_of(spec)
    impl = methods.get(method)
    model, tok = load_model(base_dir, dev, dt, device_map=device_map, allow_pickle=allow_pickle)
    target = impl.locate(model, layer, module_path, config_file, ckpt.manifest["target"] if ckpt else None)
    mem = impl.attach(model, target, tok)
    if ckpt is not None:
        try:
            impl.restore(mem, ckpt.tensors, ckpt.manifest)
        except CheckpointError as exc:
            raise CheckpointError(f"{ckpt.path}: {exc}", hint=exc.hint) from None
    blocks = get_module(model, target.layers_path)
    return Session(model, tok, mem, target, blocks, base_dir, origin, ckpt.manifest if ckpt else None,
                   dev, dt, time.perf_counter() - t0, alias, impl.name)


def read_patched(path: Path, base: str | None = None, verify: bool = True) -> PatchedCheckpoint:
    """A patched checkpoint with its base found: ``base`` (``--base PATH|ALIAS``), the recorded
    path, the recorded alias, or any cached model whose weights hash as recorded."""
    given = resolve_base(base) if base else None
    ckpt = read_checkpoint(path, verify=verify, base=given, elsewhere=_other_bases)
    methods.get(ckpt.manifest["method"]).check_state(ckpt.manifest, ckpt.tensors,
                                                     str(Path(path) / "wise.safetensors"))
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


def _checkpoint_method(ckpt: PatchedCheckpoint, method: str | None) -> str:
    saved = ckpt.manifest["method"]
    if method is not None and method != saved:
        raise ConfigError(f"--method {method} differs from the checkpoint's method '{saved}'",
                          hint="a patched checkpoint keeps its method; omit --method")
    return saved
