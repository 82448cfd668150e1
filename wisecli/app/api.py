"""The Python API: what the CLI does, for a program.

    import wisecli
    run = wisecli.edit("smollm2-135m", "edits.jsonl", "patched/")
    model, tokenizer = wisecli.load("patched/")
    report = wisecli.evaluate("patched/", "edits.jsonl")

``load`` gives a transformers model with its side memory and router attached, so
``generate``, ``pipeline("text-generation", model=model, tokenizer=tokenizer)``, padded
batches and chat templates work as on the base model.  ``edit`` and ``evaluate`` run the
same code as ``wise edit`` and ``wise eval``.
"""
from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any, Sequence

import torch.nn as nn

from wisecli import methods
from wisecli.app.edits import EditRecord, load_edits, load_prompts
from wisecli.app.metrics import EvalReport, evaluate as _evaluate
from wisecli.runtime.hf_remote import _refuse_save
from wisecli.app.pipeline import EditOptions, EditRun, Reporter, edit as _edit
from wisecli.app.session import open_model
from wisecli.runtime.memory import SideMemoryLayer

# The method's layer of each model ``load`` gave, for ``evaluate``: a plain-weights method's
# holder is not a submodule (its unedited weights must not join the model's state dict).
_LAYERS: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()


def load(model: str | Path = "default", *, device: str = "auto", dtype: str = "auto",
         device_map: str | None = None, base: str | Path | None = None,
         allow_pickle: bool = False) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for MODEL as the CLI takes it: an alias, an HF directory, a .gguf
    file, or a patched checkpoint (its edits applied; ``base`` where a patch-only one's base
    is, when moved).  The tokenizer pads on the left."""
    sess = open_model(str(model), device=device, dtype=dtype, device_map=device_map,
                      base=str(base) if base is not None else None, allow_pickle=allow_pickle)
    if not methods.get(sess.method).plain:  # plain weights save as any model; a side memory does not
        sess.model.save_pretrained = _refuse_save
    _LAYERS[sess.model] = sess.mem
    return sess.model, sess.tokenizer


def edit(model: str | Path, edits: str | Path | Sequence[EditRecord], output: str | Path | None = None, *,
         reporter: Reporter | None = None, **options: Any) -> EditRun:
    """Apply ``edits`` to ``model`` and write the patched checkpoint to ``output`` (None: keep
    the result in memory, ``run.session``).  ``options`` are ``pipeline.EditOptions`` fields:
    mode, config_file, layer, module_path, negatives, seed, patch_only, force, evaluate,
    arrival, device, dtype, device_map."""
    return _edit(str(model), edits, output, EditOptions(**options), reporter)


def evaluate(model: str | Path | nn.Module, edits: str | Path | Sequence[EditRecord], *, tokenizer: Any = None,
             locality: str | Path | None = None, generate: bool = True, batch_size: int = 16,
             device: str = "auto", dtype: str = "auto", base: str | Path | None = None) -> EvalReport:
    """``wise eval``'s figures for ``edits`` on ``model``: a path or alias, or a model from
    ``load`` with its ``tokenizer``."""
    records = list(edits) if not isinstance(edits, (str, Path)) else load_edits(Path(edits))
    extra = [(p, None) for p in load_prompts(Path(locality))] if locality else None
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise TypeError("evaluate(model, ...) with a loaded model needs its tokenizer=")
        mem = _LAYERS.get(model) or next((m for m in model.modules() if isinstance(m, SideMemoryLayer)), None)
    else:
        sess = open_model(str(model), device=device, dtype=dtype, base=str(base) if base is not None else None)
        model, tokenizer, mem = sess.model, sess.tokenizer, sess.mem
    mem = mem if mem is not None and mem.n_memories else None  # an unedited model is local by definition
    return _evaluate(model, tokenizer, mem, records, extra_locality=extra, batch_size=batch_size,
                     generate=generate)
