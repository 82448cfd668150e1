"""wise edit: train edits into a side memory and write a patched checkpoint."""
from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..checkpoint import write_checkpoint
from ..edits import load_edits, load_prompts
from ..errors import OutputExistsError
from ..evaluate import evaluate
from ..report import eval_table, summary_table
from ..session import base_manifest, editor_state, open_model, session_config
from ..wise.editor import WiseEditor
from . import console
from .options import Device, DeviceMap, DType, Json, ModelArg


def edit(
    model: ModelArg,
    edits: Annotated[Optional[Path], typer.Argument(show_default=False, help="(MODEL may be omitted: the default model is used.) Edits: JSONL (prompt, target_new, ...) or an EasyEdit/MEND/KnowEdit JSON file.")] = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", show_default=False, help="Directory for the patched checkpoint (required).")] = None,
    mode: Annotated[Optional[str], typer.Option(help="merge (one side memory) or retrieve (several, top-1 routing). Default: merge, or the checkpoint's.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML file of hyper-parameters (keys of WiseConfig).")] = None,
    layer: Annotated[Optional[int], typer.Option(help="Decoder block whose FFN output projection gets the side memory (default ≈ 0.8 × depth).")] = None,
    module_path: Annotated[Optional[str], typer.Option(help="Dotted path of the FFN output projection, for architectures wise does not know.")] = None,
    negatives: Annotated[Optional[Path], typer.Option(help="Irrelevant prompts for the router (txt, JSONL, or an edit file's locality prompts). Default: text the model writes itself.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for prefixes, negatives and shard masks.")] = None,
    patch_only: Annotated[bool, typer.Option("--patch-only", help="Write only the wise files and a hash-checked reference to the base.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT if it exists.")] = False,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip measuring the edits after training.")] = False,
    device: Device = "auto",
    dtype: DType = "auto",
    device_map: DeviceMap = None,
    json_out: Json = False,
) -> None:
    """Apply EDITS to MODEL and write the patched checkpoint to OUTPUT.

    Examples:

      wise edit smollm2-135m examples/edits.jsonl -o patched/

      wise edit patched/ next-month.jsonl -o patched-v2/     # lifelong: earlier edits stay
    """
    quiet = json_out
    if output is None:
        raise typer.BadParameter("missing option -o/--output", param_hint="-o/--output")
    if edits is None:  # `wise edit EDITS`: the default model
        model, edits = "default", Path(model)
    records = load_edits(edits)
    neg = load_prompts(negatives) if negatives else None
    if output.exists() and not force:
        raise OutputExistsError(f"{output} already exists", hint="pass --force to replace it")
    t_start = time.perf_counter()
    sess = open_model(str(model), device=device, dtype=dtype, layer=layer, module_path=module_path,
                      device_map=device_map, progress=lambda m: console.status(m, quiet),
                      config_file=str(config) if config else None)
    cfg = session_config(sess, str(config) if config else None, {"mode": mode, "layer": layer, "seed": seed})
    sess.mem.hold = cfg.hold_routing
    console.status(f"loaded {sess.origin} ({sess.target.model_type}, {sess.device}, {str(sess.dtype).replace('torch.', '')}) "
                   f"in {sess.load_seconds:.1f}s; side memory at {sess.target.module_path}", quiet)
    editor = WiseEditor(sess.model, sess.tokenizer, sess.mem, sess.blocks, sess.target.layer, cfg,
                        editor_state(sess))
    editor.prepare(neg, source=str(negatives) if negatives else "generated")
    t_edit = time.perf_counter()
    with console.progress_bar("editing", len(records), quiet) as bar:
        def on_progress(p: dict) -> None:
            if bar:
                bar(p["done"], f"shard {p['shard']} step {p['step']} loss {p['loss']:.3f}")
        placed = editor.apply(records, on_progress)
    edit_seconds = time.perf_counter() - t_edit
    report = None
    if not no_eval:
        with console.progress_bar("evaluating", len(records), quiet) as bar:
            report = evaluate(sess.model, sess.tokenizer, sess.mem, records,
                              progress=(lambda d, t: bar(d * len(records) // max(t, 1))) if bar else None)
    manifest = edit_manifest(sess, cfg, editor, records, placed, report, edits, edit_seconds)
    write_checkpoint(output, base_dir=sess.base_dir, tensors=dict(sess.mem.wise_state()),
                     manifest=manifest, patch_only=patch_only, force=force,
                     progress=lambda m: console.status(m, quiet))
    summary = {
        "output": str(output), "n_edits": len(records), "mode": cfg.mode,
        "module": sess.target.module_path, "memories": sess.mem.n_memories,
        "edits_total": len(manifest["edits"]), "seconds_editing": round(edit_seconds, 2),
        "seconds_per_edit": round(edit_seconds / len(records), 3),
        "seconds_total": round(time.perf_counter() - t_start, 2), "device": str(sess.device),
        "metrics": report.to_dict() if report else None,
    }
    if json_out:
        console.print_json(summary)
        return
    if report:
        console.out.print(eval_table(report, title=f"edits applied to {sess.origin}"))
    console.out.print(summary_table("wise edit", {k: v for k, v in summary.items() if k != "metrics"}))


def edit_manifest(sess, cfg, editor, records, placed, report, edits_path: Path, seconds: float) -> dict:
    """The manifest of a checkpoint after an edit run: the prior runs' edits plus these.
    Public because the quality benchmark writes the same checkpoints ``wise edit`` does."""
    prior = sess.manifest or {}
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    run = len(prior.get("runs", []))
    by_id = {p["id"]: p for p in placed}
    applied = list(prior.get("edits", [])) + [
        {"id": r.id, "prompt": r.prompt, "target_new": r.target_new, "run": run,
         "shard": by_id[r.id]["shard"], "memory": by_id[r.id].get("memory"),
         "subject": by_id[r.id].get("subject"), "time": now}
        for r in records]
    mem = sess.mem
    return {
        **base_manifest(sess),
        "mode": cfg.mode,
        "config": cfg.to_dict(),
        "router": {"scale": float(mem.scale), "thresholds": mem.thresholds.tolist(),
                   "min_edit_scores": mem.min_edit_scores.tolist(), "n_memories": mem.n_memories},
        "editor": editor.state.to_dict(),
        "edits": applied,
        "runs": list(prior.get("runs", [])) + [{
            "time": now, "edits_file": str(edits_path), "n_edits": len(records),
            "seconds": round(seconds, 2), "device": str(sess.device),
            "dtype": str(sess.dtype).replace("torch.", ""), "config": cfg.to_dict()}],
        "metrics": report.to_dict() if report else prior.get("metrics"),
    }
