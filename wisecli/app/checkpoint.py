"""Patched-checkpoint files: atomic write, read, verify.

A patched directory is a base Hugging Face checkpoint plus ``wise.safetensors``
(side memories and router state) and ``wise.json`` (the manifest; its content and the
upgrade of older formats are in ``manifest.py``).  Only safetensors and JSON are ever
read -- never pickle -- so a checkpoint from someone else cannot run code, and old
checkpoints keep loading on newer PyTorch.

``wise.safetensors`` holds the ``SideMemoryLayer`` buffers (``wise_state``):
  memories (K, d_out, d_in) f16   side memories as deltas D_k = W'_k - W, null-space projected
                                   (f32: written before format 4, where f16 would not be exact)
  thresholds, min_edit_scores (K,) router threshold per memory, and the score it derives from
  scale () f32, basis (d_in, r) f32   score unit; directions side memories ignore
  edit_keys (M, d_in) f8, key_exponents (M,) i16   router keys: float8 values times a power of two
                                   (f16 and no exponents: written before format 4)
  key_edit, key_memory (M,) i64    the edit and the memory each key belongs to
  answer_keys (A, d_in) f8, answer_key_exponents (A,) i16, answer_key_edit (A,) i64
                                   answer-gate keys and their edit (none before format 5)
  other_keys (O, d_in) f8, other_key_exponents (O,) i16, other_key_edit (O,) i64
                                   other relations of each edit's subject (none before format 7)
  replay_factor (d_in, r) f16, replay_count ()   merge mode: F with F F^T earlier edits' mean a a^T

Invariant: nothing half-written is ever visible at the output path.  A write is
built in a temporary sibling directory and renamed into place only when complete.
"""
from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import safetensors.torch
import torch

from wisecli.app import atomic, plain_weights
from wisecli.app.bundle import modeling_source
from wisecli.errors import CheckpointError, ModelError, OutputExistsError, WiseError
from wisecli.app.hashing import sha256_file, sha256_file_cached, share_hash
from wisecli.runtime.hf_remote import MODELING_FILE, PATCHED_ARCHITECTURE, PATCHED_MODEL_TYPE
from wisecli.app.manifest import FORMAT_VERSION, upgrade
WEIGHTS_NAME = "wise.safetensors"
MANIFEST_NAME = "wise.json"

_AUX_NAMES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja",
)
_STALE_HINT = "the base model changed since the patch was written; re-run wise edit on the new base"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class PatchedCheckpoint:
    """A loaded patch.  ``base_dir`` is where the base weights live: ``path`` itself
    when they are embedded, else the base directory the manifest references."""

    path: Path
    manifest: dict
    tensors: dict[str, torch.Tensor]
    base_dir: Path


# --------------------------------------------------------------------------- layout

def base_weight_files(model_dir: Path) -> list[Path]:
    """Weight files of an HF directory, our own ``wise.safetensors`` excluded."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    suffixes = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
    return sorted(p for p in model_dir.iterdir()
                  if p.name != WEIGHTS_NAME and p.name.endswith(suffixes) and p.is_file())


def base_aux_files(model_dir: Path) -> list[Path]:
    """Config and tokenizer files: small, and they let any tool inspect the checkpoint."""
    return [Path(model_dir) / n for n in _AUX_NAMES if (Path(model_dir) / n).is_file()]


def _write_aux(tmp: Path, base_dir: Path, weights: list[Path], report: Progress, plain: bool) -> None:
    """The base's tokenizer files (and weights unless patch-only), the config.json: the
    base's own for plain weights, else the patched one and the modeling file it names."""
    config = base_config(base_dir)
    for f in base_aux_files(base_dir) + weights:
        if f.name != "config.json":
            _place(f, tmp / f.name, report)
    (tmp / "config.json").write_text(json.dumps(config if plain else patched_config(config), indent=2) + "\n")
    if not plain:
        (tmp / MODELING_FILE).write_text(modeling_source())


def is_patched(path: Path) -> bool:
    """A directory with either half of a patch (a lone half is an error to report, never the
    base to load without its edits)."""
    p = Path(path)
    return (p / MANIFEST_NAME).exists() or (p / MANIFEST_NAME).is_symlink() or (p / WEIGHTS_NAME).exists()


def base_config(model_dir: Path) -> dict:
    """The base model's config.json as a dict; a patched directory nests it (``patched_config``)."""
    path = Path(model_dir) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"{path}: unreadable config ({e})") from e
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    if data.get("model_type") == PATCHED_MODEL_TYPE:
        nested = data.get("base_config")
        if not isinstance(nested, dict) or "model_type" not in nested:
            raise CheckpointError(f"{path}: a patched config without its 'base_config'")
        return nested
    return data


def patched_config(base: dict) -> dict:
    """config.json of a patched checkpoint.  The base's config is nested, not at the top, so
    that no loader takes the directory for the base architecture and silently gives the
    unedited model: transformers needs ``trust_remote_code=True`` (``hf_remote.py``), other
    tools stop."""
    module = MODELING_FILE.removesuffix(".py")
    return {"architectures": [PATCHED_ARCHITECTURE], "model_type": PATCHED_MODEL_TYPE,
            "auto_map": {"AutoConfig": f"{module}.WisePatchedConfig",
                         "AutoModelForCausalLM": f"{module}.{PATCHED_ARCHITECTURE}"},
            "base_config": base}


def _weights_dir(base_dir: Path) -> Path:
    """A patch-only checkpoint holds no weights; editing it again must point at the
    base it references, or the new patch would record no base at all."""
    if not is_patched(base_dir):
        return base_dir
    try:
        base = json.loads((base_dir / MANIFEST_NAME).read_text())["base"]
        return base_dir if base["embedded"] else (base_dir / base["path"]).resolve()
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{base_dir / MANIFEST_NAME}: unreadable manifest ({e})") from e


# --------------------------------------------------------------------------- write

def _check_target(out: Path, sources: list[Path], force: bool) -> None:
    o = out.resolve()
    for src in sources:
        s = src.resolve()
        if o == s or s in o.parents or o in s.parents:
            raise WiseError(f"refusing to write {out}: it overlaps the model being read ({src})",
                            hint="choose an output directory outside the base model")
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise OutputExistsError(f"{out} already exists", hint="pass --force to replace it")
    if out.is_symlink() or not out.is_dir():
        raise OutputExistsError(f"{out} already exists and is not a directory",
                                hint="--force only replaces a directory; remove it or pick another path")
    # --force deletes the old directory; never let a typo (-o ~) wipe unrelated files.
    if any(out.iterdir()) and not is_patched(out):
        raise OutputExistsError(f"{out} already exists and is not a patched checkpoint",
                                hint="--force only replaces a checkpoint written by wise; remove it yourself")


def _place(src: Path, dst: Path, report: Progress) -> None:
    """Hard-link when possible: instant and no extra disk, and safe because base files
    are never modified in place.  Copy across filesystems or where links are refused."""
    src = src.resolve()  # HF hub snapshots are relative symlinks into blobs/
    try:
        os.link(src, dst)
        report(f"linked {dst.name}")
    except OSError:
        report(f"copying {dst.name}")
        shutil.copy2(src, dst)


def _full_manifest(manifest: dict, out: Path, base_path: Path, files: dict[str, str],
                   tensors: dict[str, torch.Tensor], embedded: bool) -> dict:
    """``base.path`` is where the base weights are, relative to the checkpoint: ``.`` when
    embedded, so a checkpoint moved together with its base still finds it."""
    full = {"format_version": FORMAT_VERSION}
    full.update((k, copy.deepcopy(v)) for k, v in manifest.items() if k != "format_version")
    base = dict(full.get("base") or {})
    where = "." if embedded else os.path.relpath(base_path.resolve(), out.resolve())
    base.update(path=where, embedded=embedded, files=files)
    full["base"] = base
    full["tensors"] = {name: {"shape": list(t.shape), "dtype": _dtype_name(t)}
                       for name, t in tensors.items()}
    return full


def write_checkpoint(out: Path, *, base_dir: Path, tensors: dict[str, torch.Tensor],
                     manifest: dict, patch_only: bool = False, force: bool = False,
                     progress: Progress | None = None, plain: bool = False) -> Path:
    """Write a patched checkpoint atomically; the caller's ``manifest`` is not mutated.

    ``plain``: the method's edits are weight shifts (``shift.<module path>`` tensors, from
    the unedited base); the checkpoint holds the edited weights under the base's own
    config.json, loadable by any tool, and its ``base.files`` are the files it holds.

    Hashing and manifest serialisation happen before anything is written, so an
    unhashable base or a non-JSON manifest fails before gigabytes are copied."""
    out, base_dir = Path(out), Path(base_dir)
    report = progress or (lambda _msg: None)
    if not base_dir.is_dir():
        raise ModelError(f"{base_dir}: base model directory not found")
    weights_dir = _weights_dir(base_dir)
    _check_target(out, [base_dir, weights_dir], force)
    weights = base_weight_files(weights_dir)
    if not weights:
        raise ModelError(f"{weights_dir}: no weight files (*.safetensors, *.bin)",
                         hint="pass a Hugging Face checkpoint directory")
    already, unedited = plain_weights.shifts_in(weights_dir, MANIFEST_NAME, WEIGHTS_NAME) if plain else ({}, {})
    if plain and patch_only and already:
        raise CheckpointError(f"{base_dir}: holds edited weights; a --patch-only checkpoint refers to an unedited base",
                              hint="omit --patch-only, or continue from a --patch-only checkpoint or the base")
    files = _hash_files(weights + [f for f in base_aux_files(base_dir) if f.name != "config.json"], report)
    full = _full_manifest(manifest, out, weights_dir, files, tensors, embedded=not patch_only)
    full["base"]["config_sha256"] = config_digest(base_config(base_dir))
    json.dumps(full)  # a manifest that cannot be written fails here, before gigabytes are copied

    try:
        with atomic.locked(out):
            atomic.recover(out)
            _check_target(out, [base_dir, weights_dir], force)  # again: another writer may have finished
            with atomic.building(out) as tmp:
                edited = plain and not patch_only
                _write_aux(tmp, base_dir, [] if patch_only or edited else weights, report, plain)
                if edited:
                    shifts = plain_weights.weight_shifts(tensors)
                    for name in plain_weights.write_edited(tmp, weights, shifts, already, _place, report):
                        unedited.setdefault(name, full["base"]["files"][name])
                        full["base"]["files"][name] = sha256_file(tmp / name)
                    full["base"]["unedited_files"] = unedited
                report(f"writing {WEIGHTS_NAME}")
                # clone: safetensors refuses tensors that share storage (e.g. views of one buffer)
                safe = {k: t.detach().cpu().contiguous().clone() for k, t in tensors.items()}
                safetensors.torch.save_file(safe, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
                full["state_sha256"] = sha256_file(tmp / WEIGHTS_NAME)
                (tmp / MANIFEST_NAME).write_text(json.dumps(full, indent=2) + "\n")
                atomic.swap_in(tmp, out)
    except BaseException as exc:
        _raise_disk_error(exc, out)
        raise
    if not patch_only:
        for f in weights:
            share_hash(f, out / f.name)  # an edited file is newer than its source: not shared
    return out


def _hash_files(paths: list[Path], report: Progress) -> dict[str, str]:
    files = {}
    for f in paths:
        report(f"hashing {f.name}")
        files[f.name] = sha256_file_cached(f)
    return files


def config_digest(config: dict) -> str:
    """SHA-256 of a config as canonical JSON: a patched directory nests the base's config
    rather than keeping its file, so the file's bytes are not what is compared."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _raise_disk_error(exc: BaseException, out: Path) -> None:
    """A full disk or a file-size limit while writing: a user's problem, said in one line."""
    text = str(exc)
    full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    if full or "File too large" in text or "No space left" in text:
        raise WiseError(f"{out}: the disk is full or a file-size limit was reached while writing; "
                        "nothing was written", hint="free space (or raise the limit) and run again") from None


# --------------------------------------------------------------------------- read

def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _read_manifest(path: Path) -> dict:
    """Validate the manifest's shape up front so later code can index it without guards."""
    mf = path / MANIFEST_NAME
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory")
    if not (mf.exists() or mf.is_symlink()):
        raise CheckpointError(f"{path}: {WEIGHTS_NAME} without its {MANIFEST_NAME}: the checkpoint is incomplete"
                              if (path / WEIGHTS_NAME).exists() else
                              f"{path}: no {MANIFEST_NAME}; not a checkpoint written by wise")
    try:
        if not mf.is_file():
            raise CheckpointError(f"{mf}: not a regular file")
        m = json.loads(mf.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{mf}: not valid JSON ({str(e)[:120]})") from None
    except RecursionError:
        raise CheckpointError(f"{mf}: not valid JSON (nested too deeply)") from None
    if not isinstance(m, dict):
        raise CheckpointError(f"{mf}: expected a JSON object")
    v = m.get("format_version")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise CheckpointError(f"{mf}: missing or invalid 'format_version'")
    if v > FORMAT_VERSION:
        raise CheckpointError(f"{mf}: format_version {v} is newer than this wise reads ({FORMAT_VERSION})",
                              hint="upgrade wisecli")
    base, specs = m.get("base"), m.get("tensors")
    if not (isinstance(base, dict) and isinstance(base.get("path"), str)
            and isinstance(base.get("embedded"), bool) and isinstance(base.get("files"), dict)):
        raise CheckpointError(f"{mf}: missing or invalid 'base' (needs path, embedded, files)")
    for name, digest in base["files"].items():
        if Path(name).name != name or name in ("", ".", "..") or not isinstance(digest, str):
            raise CheckpointError(f"{mf}: invalid entry in base.files: {name!r}")
    if not isinstance(specs, dict) or not all(
            isinstance(s, dict) and isinstance(s.get("shape"), list) and isinstance(s.get("dtype"), str)
            for s in specs.values()):
        raise CheckpointError(f"{mf}: missing or invalid 'tensors' (needs shape and dtype per tensor)")
    return m


def _load_tensors(path: Path, specs: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Check key sets, shapes and dtypes before anyone uses a tensor; name the first mismatch."""
    wf, mf = path / WEIGHTS_NAME, path / MANIFEST_NAME
    if not wf.is_file():
        raise CheckpointError(f"{wf}: missing")
    try:
        tensors = safetensors.torch.load_file(str(wf))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{wf}: unreadable ({e})") from e
    for name in sorted(specs):
        if name not in tensors:
            raise CheckpointError(f"{wf}: tensor '{name}' listed in {mf} is missing")
    for name in sorted(tensors):
        if name not in specs:
            raise CheckpointError(f"{wf}: tensor '{name}' is not listed in {mf}")
    for name in sorted(specs):
        t, s = tensors[name], specs[name]
        if list(t.shape) != s["shape"]:
            raise CheckpointError(f"{wf}: tensor '{name}' has shape {list(t.shape)}, {mf} says {s['shape']}")
        if _dtype_name(t) != s["dtype"]:
            raise CheckpointError(f"{wf}: tensor '{name}' has dtype {_dtype_name(t)}, {mf} says {s['dtype']}")
    return tensors


def _verify_state(path: Path, manifest: dict) -> None:
    """wise.safetensors is the file the manifest was written with (format 2 records its hash)."""
    want = manifest.get("state_sha256")
    wf = path / WEIGHTS_NAME
    if want is None:
        if manifest["format_version"] >= 2:
            raise CheckpointError(f"{path / MANIFEST_NAME}: field 'state_sha256' is missing")
        return  # format 1 kept no checksum
    if not wf.is_file():
        raise CheckpointError(f"{wf}: missing")
    if not isinstance(want, str) or sha256_file_cached(wf) != want:
        raise CheckpointError(f"{wf}: does not match the SHA-256 recorded in {MANIFEST_NAME} (corrupted or changed)",
                              hint="restore the checkpoint, or re-create it with wise edit")


def _verify_base(path: Path, base_dir: Path, files: dict[str, str], config_sha: str | None = None) -> None:
    """The side memory was trained against these exact weights; on any other base it
    would route and correct wrongly without any visible error."""
    mf = path / MANIFEST_NAME
    if not files:
        raise CheckpointError(f"{mf}: 'base.files' is empty: nothing to verify the base weights against")
    if not base_dir.is_dir():
        raise CheckpointError(f"{base_dir}: base model recorded in {mf} not found",
                              hint="pass --base PATH|ALIAS, or restore the base model at that path")
    for name, want in files.items():
        f = base_dir / name
        if not f.is_file():
            raise CheckpointError(f"{f}: base weight file recorded in {mf} is missing",
                                  hint="restore the base model, or re-run wise edit on it")
        if sha256_file_cached(f) != want:
            raise CheckpointError(f"{f}: SHA-256 does not match the base recorded in {mf}", hint=_STALE_HINT)
    if config_sha is not None and config_digest(base_config(base_dir)) != config_sha:
        raise CheckpointError(f"{base_dir / 'config.json'}: the base's config differs from the one recorded in {mf}",
                              hint=_STALE_HINT)


def read_checkpoint(path: Path, *, verify: bool = True, base: Path | None = None,
                    elsewhere: Callable[[dict], list[Path]] | None = None) -> PatchedCheckpoint:
    """Load and check a patched checkpoint; ``verify=False`` skips hashing the base
    (for inspecting a manifest when the base is elsewhere or slow to read).

    A patch-only checkpoint's base is, in order: ``base`` (the user's ``--base``), the
    recorded path (relative to the checkpoint), then the directories ``elsewhere(manifest's
    base)`` offers (its recorded alias, cached models) whose weights match the recorded
    SHA-256 — always verified by hash before use.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    _verify_state(path, manifest)
    tensors = _load_tensors(path, manifest["tensors"])
    manifest, tensors = upgrade(manifest, tensors, str(path / MANIFEST_NAME))
    meta = manifest["base"]
    if meta["embedded"]:
        if base is not None:
            raise CheckpointError(f"{path}: --base is for --patch-only checkpoints; this one holds its base weights")
        if verify:
            _verify_base(path, path, meta["files"], meta.get("config_sha256"))
        base_dir = path
    else:
        base_dir = _locate_base(path, meta, base, verify, elsewhere)
    return PatchedCheckpoint(path=path, manifest=manifest, tensors=tensors, base_dir=base_dir)


def _locate_base(path: Path, meta: dict, given: Path | None, verify: bool,
                 elsewhere: Callable[[dict], list[Path]] | None) -> Path:
    """The user's base, else the recorded one, else the first other candidate whose weights
    are the recorded ones; the recorded path's own error when none is."""
    if given is not None:
        if verify:
            _verify_base(path, Path(given), meta["files"], meta.get("config_sha256"))
        return Path(given)
    recorded = (path / meta["path"]).resolve()  # relative to the checkpoint (format 1: absolute)
    if not verify:
        return recorded
    try:
        _verify_base(path, recorded, meta["files"], meta.get("config_sha256"))
        return recorded
    except CheckpointError as exc:
        for candidate in (elsewhere(meta) if elsewhere else []):
            try:
                _verify_base(path, candidate, meta["files"], meta.get("config_sha256"))
                return candidate
            except CheckpointError:
                continue
        raise exc
