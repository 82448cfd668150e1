"""The edit pipeline: open the model, resolve the config, prepare, apply, evaluate, build the
manifest, write the checkpoint atomically.

``wise edit`` and ``benchmarks/quality.py`` both call ``edit``, so the benchmark's figures are
the command's; the CLI only parses options and renders the ``EditRun`` it gets back.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from datetime import datetime, timezone
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Protocol, Sequence

import torch

from wisecli import __version__, methods
from wisecli.app.checkpoint import write_checkpoint
from wisecli.app.edits import EditRecord, load_edits, load_prompts
from wisecli.app.metrics import EvalReport, evaluate
from wisecli.app.session import Session, open_model
from wisecli.errors import OutputExistsError
from wisecli.methods.base import Editor

Tick = Callable[[int, str], None]  # (items done so far, a short note)


class Reporter(Protocol):
    """Where the pipeline tells what it is doing: a console, a log, or nowhere."""

    def status(self, message: str) -> None: ...

    def phase(self, name: str, total: int) -> ContextManager[Tick]: ...


class Silent:
    def status(self, message: str) -> None:
        pass

    @contextmanager
    def phase(self, name: str, total: int) -> Iterator[Tick]:
        yield lambda done, note="": None


@dataclass(frozen=True)
class EditOptions:
    """Everything about a run but the model, the edits and the output (all optional)."""

    mode: str | None = None               # None: merge, or the checkpoint's
    config_file: str | None = None        # YAML of the method's config keys (WISE: WiseConfig)
    method: str | None = None             # None: wise, or the checkpoint's
    layer: int | tuple[int, ...] | None = None   # a tuple: several blocks (ultraedit)
    module_path: str | None = None
    negatives: str | None = None          # a file of irrelevant prompts; None: the model writes them
    seed: int | None = None
    patch_only: bool = False
    force: bool = False
    evaluate: bool = True
    arrival: int | None = None            # apply in batches of this many, each on top of the last
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    base: str | None = None               # a patch-only checkpoint's base, when it was moved
    allow_pickle: bool = False            # load *.bin weights (unpickling can run code)


@dataclass
class EditRun:
    session: Session
    config: Any                   # the method's frozen config (WISE: WiseConfig)
    records: list[EditRecord]
    placed: list[dict]            # per edit: shard, steps, memory, subject
    report: EvalReport | None
    manifest: dict
    output: Path | None
    seconds_editing: float
    seconds_total: float

    def summary(self) -> dict[str, Any]:
        sess, n = self.session, len(self.records)
        return {
            "output": str(self.output) if self.output else None, "n_edits": n, "mode": self.config.mode,
            "module": sess.target.where, "memories": sess.mem.n_memories,
            "edits_total": len(self.manifest["edits"]), "seconds_editing": round(self.seconds_editing, 2),
            "seconds_per_edit": round(self.seconds_editing / max(n, 1), 3),
            "seconds_total": round(self.seconds_total, 2), "device": str(sess.device),
            "metrics": self.report.to_dict() if self.report else None,
        }


def edit(model: str | Session | None, edits: str | Path | Sequence[EditRecord], output: str | Path | None,
         options: EditOptions = EditOptions(), reporter: Reporter | None = None,
         edits_source: str | None = None) -> EditRun:
    """Apply ``edits`` (a file, or records) to ``model`` (MODEL as the CLI takes it, or an open
    session) and write the patched checkpoint to ``output`` (None: keep it in memory only).

    Bad input fails before the model is loaded; nothing is written unless every step worked.
    """
    rep = reporter or Silent()
    t0 = time.perf_counter()
    records = list(edits) if not isinstance(edits, (str, Path)) else load_edits(Path(edits))
    negatives = load_prompts(Path(options.negatives)) if options.negatives else None
    method = methods.get(options.method)  # a bad method or config before minutes of model loading
    if options.config_file:
        method.load_config(options.config_file, None, {"seed": options.seed})
    out = Path(output) if output is not None else None
    if out is not None and out.exists() and not options.force:
        raise OutputExistsError(f"{out} already exists", hint="pass --force to replace it")
    sess = model if isinstance(model, Session) else _open(model, options, rep)
    cfg = sess.resolve_config(options.config_file, {"mode": options.mode, "layer": options.layer, "seed": options.seed})
    editor = methods.get(sess.method).editor(sess.model, sess.tokenizer, sess.mem, sess.blocks, sess.target.layer,
                                             cfg, (sess.manifest or {}).get("editor"))
    editor.prepare(negatives, source=options.negatives or "generated")
    placed, seconds = _apply(editor, records, options.arrival, rep)
    report = _evaluate(sess, records, rep) if options.evaluate else None
    source = edits_source or (str(edits) if isinstance(edits, (str, Path)) else "records")
    tensors, state = editor.saved()
    manifest = after_run(sess, cfg, state, records, placed, report, source, seconds)
    if out is not None:
        write_checkpoint(out, base_dir=sess.base_dir, tensors=tensors, manifest=manifest,
                         patch_only=options.patch_only, force=options.force, progress=rep.status,
                         plain=methods.get(sess.method).plain)
    return EditRun(sess, cfg, records, placed, report, manifest, out, seconds, time.perf_counter() - t0)


def _open(model: str | None, options: EditOptions, rep: Reporter) -> Session:
    sess = open_model(model, device=options.device, dtype=options.dtype, layer=options.layer,
                      module_path=options.module_path, device_map=options.device_map,
                      progress=rep.status, config_file=options.config_file, base=options.base,
                      allow_pickle=options.allow_pickle, method=options.method)
    rep.status(f"loaded {sess.origin} ({sess.target.model_type}, {sess.device}, "
               f"{str(sess.dtype).replace('torch.', '')}) in {sess.load_seconds:.1f}s; "
               f"{'edits' if methods.get(sess.method).plain else 'side memory at'} {sess.target.where}")
    return sess


def _apply(editor: Editor, records: list[EditRecord], arrival: int | None,
           rep: Reporter) -> tuple[list[dict], float]:
    """Train the edits; with ``arrival``, in batches applied one on top of the other (the
    lifelong protocol: each batch shards and merges on its own)."""
    step = arrival or max(len(records), 1)
    placed: list[dict] = []
    t0 = time.perf_counter()
    with rep.phase("editing", len(records)) as tick:
        for start in range(0, len(records), step):
            def on_progress(p: dict, _start: int = start) -> None:
                tick(_start + p["done"], f"shard {p['shard']} step {p['step']} loss {p['loss']:.3f}"
                     if p.get("loss") is not None else f"turn {p['shard']} pass {p['step'] + 1}")
            placed += editor.apply(records[start:start + step], on_progress)
    return placed, time.perf_counter() - t0


def _evaluate(sess: Session, records: list[EditRecord], rep: Reporter) -> EvalReport:
    """The figures ``wise edit`` prints and keeps in the manifest: chat asked once (``wise
    eval`` asks it every way and the subject's other relations in chat; minutes more)."""
    n = len(records)
    with rep.phase("evaluating", n) as tick:
        return evaluate(sess.model, sess.tokenizer, sess.mem, records, chat_conditions=False,
                        progress=lambda done, total: tick(done * n // max(total, 1), ""))


def describe(sess: Session) -> dict:
    """The tool, the base model and the edited module."""
    t = sess.target
    prior = (sess.manifest or {}).get("base", {})
    base = {"origin": prior.get("origin", sess.origin), "model_type": t.model_type}
    if prior.get("alias", sess.alias):
        base["alias"] = prior.get("alias", sess.alias)
    return {
        "tool": {"name": "wise", "version": __version__, "torch": torch.__version__},
        "base": base,
        "target": t.describe(),
    }


def after_run(sess: Session, cfg: Any, editor_state: dict, records: Sequence[EditRecord],
              placed: list[dict], report: EvalReport | None, edits_source: str, seconds: float) -> dict:
    """The manifest after an edit run: the earlier runs' edits plus these.  ``base.path``,
    ``base.files`` and ``tensors`` are added by ``checkpoint.write_checkpoint``."""
    prior = sess.manifest or {}
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    run = len(prior.get("runs", []))
    by_id = {p["id"]: p for p in placed}
    applied = list(prior.get("edits", [])) + [
        {"id": r.id, "prompt": r.prompt, "target_new": r.target_new, "run": run,
         "shard": by_id[r.id]["shard"], "memory": by_id[r.id].get("memory"),
         "subject": by_id[r.id].get("subject"), "time": now}
        for r in records]
    return {
        **describe(sess),
        "method": sess.method,
        "mode": cfg.mode,
        "config": cfg.to_dict(),
        "router": methods.get(sess.method).summary(sess.mem),
        "editor": editor_state,
        "edits": applied,
        "runs": list(prior.get("runs", [])) + [{
            "time": now, "edits_file": edits_source, "n_edits": len(records),
            "seconds": round(seconds, 2), "device": str(sess.device),
            "dtype": str(sess.dtype).replace("torch.", ""), "config": cfg.to_dict()}],
        "metrics": report.to_dict() if report else prior.get("metrics"),
    }
