"""The files of a plain-weights checkpoint (a method with ``Method.plain``, e.g. ultraedit).

Such a method saves ``shift.<module path>``: what it added, in float32, to that module's
weight of the unedited base.  Its checkpoint holds the base's weight files with those shifts
added, each tensor in its file's own dtype, so that any loader reads the edited model; when
the base it was edited from is itself such a checkpoint, the shifts already in its files are
taken out first (a continued run's shifts are totals from the unedited base).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import safetensors
import safetensors.torch
import torch

from wisecli.errors import CheckpointError, ModelError

SHIFT_PREFIX = "shift."
Progress = Callable[[str], None]


def weight_shifts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A plain-weights method's saved shifts, by the name of the weight they change."""
    return {f"{name.removeprefix(SHIFT_PREFIX)}.weight": t for name, t in tensors.items()
            if name.startswith(SHIFT_PREFIX)}


def shifts_in(weights_dir: Path, manifest_name: str, weights_name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The shifts already in a directory's weight files (an embedded plain checkpoint's), and
    the SHA-256 of those files before any edit."""
    try:
        manifest = json.loads((weights_dir / manifest_name).read_text())
        if not manifest["base"]["embedded"]:
            return {}, {}
        shifts = weight_shifts(safetensors.torch.load_file(str(weights_dir / weights_name)))
        return shifts, dict(manifest["base"].get("unedited_files") or {})
    except FileNotFoundError:
        return {}, {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{weights_dir}: unreadable checkpoint ({e})") from e


def write_edited(tmp: Path, weights: list[Path], shifts: dict[str, torch.Tensor],
                 already: dict[str, torch.Tensor], place: Callable[[Path, Path, Progress], None],
                 report: Progress) -> list[str]:
    """The base's weight files with the shifts added (each tensor in its own dtype; the
    shifts ``already`` in them taken out first); files without an edited tensor are linked.
    Returns the names of the files written."""
    left, written = set(shifts), []
    for f in weights:
        if not f.name.endswith(".safetensors"):
            if f.name.endswith((".bin", ".bin.index.json")):
                raise ModelError(f"{f}: plain weights are written into safetensors files, and this base "
                                 "stores pickles", hint="convert the base to safetensors first")
            place(f, tmp / f.name, report)
            continue
        with safetensors.safe_open(str(f), "pt") as reader:
            names, metadata = list(reader.keys()), reader.metadata()
            if not left & set(names):
                place(f, tmp / f.name, report)
                continue
            report(f"writing the edited {f.name}")
            tensors = {n: reader.get_tensor(n) for n in names}
        for name in left & set(names):
            t = tensors[name].float() - already.get(name, 0) + shifts[name].float().cpu()
            tensors[name] = t.to(tensors[name].dtype)
        left -= set(names)
        safetensors.torch.save_file(tensors, str(tmp / f.name), metadata=metadata)
        written.append(f.name)
    if left:
        raise ModelError(f"the base's weight files have no tensor '{sorted(left)[0]}'")
    return written
