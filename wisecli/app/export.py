"""``wise export``: fold a side memory into the base weights, for stacks that cannot route.

A folded checkpoint is the base with ``W + D_k`` as the edited projection: every prompt goes
through the side memory, so the edits hold, but prompts the router would have kept on the
main memory change too.  ``folding_cost`` measures that on the same prompts before (routed)
and after (folded), against the unedited model's greedy answers.

A method that writes plain weights (ultraedit) has nothing to fold: its checkpoint is already
the edited model, and export only changes the container (what it changes against the
unedited model is measured the same way).

Two outputs: a plain Hugging Face checkpoint (``--to merged``), or a GGUF file (``--to gguf``)
rewritten from the GGUF the base was converted from, with only the edited tensors replaced
(float32; every other tensor keeps its bytes and quantisation).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from wisecli import methods
from wisecli.app.aliases import convert_alias, convert_gguf, fetch_gguf
from wisecli.batching import encode_pairs
from wisecli.app import atomic
from wisecli.app.checkpoint import base_aux_files, is_patched, sha256_file_cached
from wisecli.errors import CheckpointError, OutputExistsError, WiseError
from wisecli.methods.locate import set_module
from wisecli.app.session import Session
from wisecli.runtime.memory import uninstall
from wisecli.runtime.router import NO_MEMORY

EXPORT_FILE = "export.json"
ANSWER_TOKENS = 8


def unrelated_prompts() -> list[str]:
    """A fixed set of ordinary prompts, about nothing in particular."""
    text = resources.files("wisecli.app").joinpath("data/unrelated.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def memory_to_fold(sess: Session, memory: int | None) -> int | None:
    """The one memory a folded model can hold: the only one, or the one named; None for a
    method whose edits are plain weights already."""
    n = sess.mem.n_memories
    if sess.manifest is None or n == 0:
        raise CheckpointError(f"{sess.origin}: nothing to export: not a patched checkpoint with edits")
    if methods.get(sess.method).plain:
        if memory is not None:
            raise CheckpointError(f"--memory {memory}: {sess.origin} holds no side memories ({sess.method} "
                                  "writes plain weights)", hint="omit --memory")
        return None
    if memory is None:
        if n > 1:
            raise CheckpointError(f"{sess.origin}: holds {n} side memories ({sess.manifest['mode']} mode); "
                                  "a folded model has room for one", hint=f"pick one with --memory 0..{n - 1}")
        return 0
    if not 0 <= memory < n:
        raise CheckpointError(f"--memory {memory}: {sess.origin} has memories 0..{n - 1}")
    return memory


@torch.no_grad()
def greedy(sess: Session, prompts: Sequence[str], tokens: int = ANSWER_TOKENS) -> list[str]:
    tok = sess.tokenizer
    out: list[str] = []
    for start in range(0, len(prompts), 16):
        chunk = list(prompts[start:start + 16])
        enc = tok(chunk, return_tensors="pt", padding=True, return_token_type_ids=False).to(sess.device)
        ids = sess.model.generate(**enc, do_sample=False, max_new_tokens=tokens, pad_token_id=tok.pad_token_id)
        out += [t.strip() for t in tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    return out


def fold(sess: Session, k: int) -> None:
    """W ← W + D_k in the base projection, and the side-memory layer taken out of the model."""
    mem = sess.mem
    weight = mem.base_layer.weight
    delta = mem.memories[k].to(weight.device)
    weight.data += (delta.T if mem.kind == "conv1d" else delta).to(weight.dtype)
    uninstall(sess.model)
    set_module(sess.model, sess.target.module_path, mem.base_layer)


def folding_cost(sess: Session, k: int | None, edits: Sequence[tuple[str, str]],
                 locality: Sequence[str]) -> dict[str, Any]:
    """Folds memory k into ``sess`` (in place) and says what that changed; ``k`` None: a
    plain-weights checkpoint, exported as it is (routed and folded are the same model).

    edits: (prompt, target) — share whose greedy answer starts with the target; locality and
    the fixed unrelated prompts — share whose answer is the unedited model's.  Each measured
    routed (before) and folded (after)."""
    groups = {"edits": [p for p, _ in edits], "locality_prompts": list(locality), "unrelated_prompts": unrelated_prompts()}
    with sess.mem.main_only():
        base = {g: greedy(sess, ps) for g, ps in groups.items()}
    routed = {g: greedy(sess, ps) for g, ps in groups.items()}
    routed_to_k = None if k is None else sum(int(r) == k for r in _routes(sess, groups["unrelated_prompts"]))
    if k is not None:
        fold(sess, k)
    folded = routed if k is None else {g: greedy(sess, ps) for g, ps in groups.items()}
    targets = [t for _, t in edits]

    def score(group: str, answers: dict[str, list[str]]) -> float | None:
        if not answers[group]:
            return None
        if group == "edits":
            return sum(_starts(a, t) for a, t in zip(answers[group], targets)) / len(targets)
        return sum(a == b for a, b in zip(answers[group], base[group])) / len(answers[group])
    report = {g: {"n": len(groups[g]), "routed": score(g, routed), "folded": score(g, folded)} for g in groups}
    report["edits"]["measure"] = "greedy answer starts with the new target"
    report["locality_prompts"]["measure"] = report["unrelated_prompts"]["measure"] = "greedy answer unchanged"
    if routed_to_k is not None:
        report["unrelated_prompts"]["routed_through_the_memory"] = routed_to_k
    report["changed_when_folded"] = [p for p, a, b in zip(groups["unrelated_prompts"], folded["unrelated_prompts"],
                                                         base["unrelated_prompts"]) if a != b]
    return report


def edited_weights(sess: Session) -> dict[str, np.ndarray]:
    """Module path -> the weight as GGUF stores it, for every weight the export changes: the
    folded projection (after ``fold``), or a plain-weights method's edited layers."""
    paths = list(getattr(sess.mem, "paths", [])) or [sess.target.module_path]
    out = {}
    for path in paths:
        weight = sess.model.get_submodule(path).weight.detach().float()
        transposed = getattr(sess.target, "kind", "linear") == "conv1d"
        out[path] = (weight.T if transposed else weight).contiguous().cpu().numpy()
    return out


def _routes(sess: Session, prompts: Sequence[str]) -> list[int]:
    batch = encode_pairs(sess.tokenizer, list(prompts), [None] * len(prompts)).to(sess.device)
    with torch.no_grad():
        sess.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    route = sess.mem.last_route
    return [NO_MEMORY] * len(prompts) if route is None else route.tolist()


def _starts(answer: str, target: str) -> bool:
    return " ".join(answer.casefold().split()).startswith(" ".join(target.casefold().split()))


# ---- writing --------------------------------------------------------------------------------

def check_output(out: Path, force: bool, gguf: bool) -> None:
    """Never overwrite without --force; with it, only what an export (or wise) wrote."""
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise OutputExistsError(f"{out} already exists", hint="pass --force to replace it")
    ours = out.is_file() and out.suffix == ".gguf" if gguf else \
        out.is_dir() and ((out / EXPORT_FILE).is_file() or is_patched(out) or not any(out.iterdir()))
    if not ours:
        raise OutputExistsError(f"{out} already exists and was not written by wise export",
                                hint="--force only replaces an earlier export; remove it yourself")


def write_merged(sess: Session, out: Path, provenance: dict) -> Path:
    """The folded model as a plain Hugging Face checkpoint, with the base's tokenizer files."""
    with atomic.locked(out):
        atomic.recover(out)
        with atomic.building(out) as tmp:
            sess.model.save_pretrained(str(tmp))
            for f in base_aux_files(sess.base_dir):
                if not (tmp / f.name).exists():
                    shutil.copy2(f, tmp / f.name)
            (tmp / EXPORT_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
            atomic.swap_in(tmp, out)
    return out


def gguf_source(sess: Session) -> Callable[[Path], Path]:
    """How to get the GGUF file the base was converted from (scratch dir -> file), when its
    conversion has the very weights the patch was trained on (checked by SHA-256)."""
    meta = sess.manifest["base"]
    alias, origin = meta.get("alias"), str(meta.get("origin", ""))
    files = {**meta["files"], **meta.get("unedited_files", {})}  # plain weights: the base's own files
    if alias and _same_weights(convert_alias(alias), files):
        return lambda scratch: fetch_gguf(alias, scratch)
    if origin.lower().endswith(".gguf") and Path(origin).is_file() and \
            _same_weights(convert_gguf(Path(origin)), files):
        return lambda _scratch: Path(origin)
    raise WiseError(f"{sess.origin}: --to gguf rewrites the GGUF the base was converted from, and this "
                    f"base ({origin}) did not come from one wise can find",
                    hint="export --to merged, then convert that with llama.cpp's convert_hf_to_gguf.py")


def _same_weights(model_dir: Path, files: dict[str, str]) -> bool:
    return all((model_dir / n).is_file() and sha256_file_cached(model_dir / n) == h for n, h in files.items())


def write_gguf(sess: Session, out: Path, source: Callable[[Path], Path]) -> Path:
    """The source GGUF with each edited weight (float32) in place of the base's."""
    from gguf import GGUFReader, GGUFWriter
    weights = edited_weights(sess)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    with atomic.locked(out), tempfile.TemporaryDirectory() as scratch:
        atomic.recover(out)
        reader = GGUFReader(str(source(Path(scratch))))
        arch = reader.fields["general.architecture"].contents()
        n_layers = sess.target.n_layers
        replaced = {_gguf_tensor(arch, n_layers, path): w for path, w in weights.items()}
        try:
            writer = GGUFWriter(str(tmp), arch=arch)
            _copy_fields(reader, writer)
            _copy_tensors(reader, writer, replaced)
            for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
                step()
            writer.close()
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    return out


def _gguf_tensor(arch: str, n_layers: int, module_path: str) -> str:
    """The GGUF name of the edited projection's weight (the gguf package's tensor-name map)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
    arch_id = next((a for a, n in MODEL_ARCH_NAMES.items() if n == arch), None)
    name = get_tensor_name_map(arch_id, n_layers).get_name(f"{module_path}.weight", try_suffixes=(".weight",)) \
        if arch_id is not None else None
    if name is None:
        raise WiseError(f"no GGUF tensor name for {module_path} in a '{arch}' GGUF")
    return name


def _copy_fields(reader: Any, writer: Any) -> None:
    from gguf import GGUFValueType
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # the writer writes its own header and architecture
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY and len(field.types) > 1 else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def _copy_tensors(reader: Any, writer: Any, replaced: dict[str, np.ndarray]) -> None:
    left = set(replaced)
    for t in reader.tensors:
        if t.name in replaced:
            want = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions innermost first
            if want != replaced[t.name].shape:
                raise WiseError(f"GGUF tensor {t.name} has shape {want}; the edited weight is {replaced[t.name].shape}")
            writer.add_tensor(t.name, replaced[t.name])
            left.discard(t.name)
        else:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    if left:
        raise WiseError(f"the source GGUF has no tensor {sorted(left)[0]}")
