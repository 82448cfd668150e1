"""``wise.json``: what the manifest of a patched checkpoint holds, and how older ones are read.

The file layout and its atomic write are in ``checkpoint.py``; this module owns the
manifest's content.  Its schema is ``wisecli/app/data/manifest.schema.json`` (JSON Schema, every
manifest read is validated against it); in short (format 2):

  format_version  2
  tool            {name, version, torch}: what wrote it
  base            {origin, alias (when a built-in alias), model_type, path (where the base
                  weights are, relative to the checkpoint: "." when embedded), embedded,
                  files: {name: sha256}}
  target          {module_path, layer, n_layers, kind, in_features, out_features}
  mode            "merge" | "retrieve"
  config          every WiseConfig field (the settings the memory was trained and is routed with)
  router          {scale, thresholds, min_edit_scores, n_memories}: a readable copy of the tensors
  editor          EditorState: prefixes, negatives, shards trained, edits per memory
  edits           one entry per edit ever applied: id, prompt, target_new, run, shard,
                  memory, subject, time
  runs            one entry per `wise edit` run: time, edits_file, n_edits, seconds, device,
                  dtype, config
  metrics         the last run's evaluation (or null)
  tensors         {name: {shape, dtype}} of wise.safetensors

Compatibility: a manifest of any older format is upgraded in ``upgrade`` (one step per
format version) when it is read, so the rest of the code only ever sees the current one.
"""
from __future__ import annotations

import copy
import json
from datetime import datetime, timezone
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any, Sequence

import torch
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from wisecli import __version__
from wisecli.methods.wise.config import WiseConfig, from_dict
from wisecli.errors import CheckpointError, ConfigError
from wisecli.runtime.maths import moment_factor

if TYPE_CHECKING:
    from wisecli.app.edits import EditRecord
    from wisecli.app.metrics import EvalReport
    from wisecli.app.session import Session

FORMAT_VERSION = 2

# Format 1 grew over releases: a setting added later is missing from the manifests written
# before it, and those checkpoints were routed as if it were off.
_V1_ABSENT_MEANS = {"key_gate": 0.0, "coverage_gate": 0.0, "subject_gate": False,
                    "score_pooling": "mean", "route_by": "closest"}


def upgrade(manifest: dict, tensors: dict[str, torch.Tensor], where: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Bring a manifest (already checked for its top-level shape) and its tensors to the
    current format; its config is validated as ``WiseConfig`` on the way (errors name ``where``)."""
    manifest, tensors = copy.deepcopy(manifest), dict(tensors)
    if manifest["format_version"] == 1:
        manifest, tensors = _from_v1(manifest, tensors)
    validate(manifest, where)
    try:
        manifest["config"] = from_dict(manifest["config"], where).to_dict()
    except ConfigError as exc:
        raise ConfigError(f"{exc} (in 'config')", hint=exc.hint) from None
    return manifest, tensors


@lru_cache(maxsize=1)
def schema() -> dict:
    """The manifest's JSON Schema (format 2)."""
    text = resources.files("wisecli.app").joinpath("data/manifest.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def validate(manifest: dict, where: str) -> None:
    """One line naming the file and the first field that does not fit the schema."""
    error = best_match(Draft202012Validator(schema()).iter_errors(manifest))
    if error is None:
        return
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
    message = error.message if len(error.message) <= 200 else error.message[:200] + "…"
    raise CheckpointError(f"{where}: field '{field or '(top level)'}': {message}",
                          hint="the manifest does not match the one wise writes; re-create the checkpoint")


def _from_v1(manifest: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg = {**_V1_ABSENT_MEANS, **(manifest.get("config") or {})}
    n_memories = int(tensors["memories"].shape[0]) if "memories" in tensors else 0
    if cfg["route_by"] == "closest" and (n_memories <= 1 or not cfg["key_gate"]):
        cfg["route_by"] = "coverage"  # the rule ranks several gated memories; here there are not
    manifest["config"] = cfg
    for edit in manifest.get("edits") or []:
        if isinstance(edit, dict):
            edit.setdefault("memory", None)  # before edits recorded their memory
    if "replay_cov" in tensors:  # before the factor: the full second moment
        cov = tensors.pop("replay_cov").float()
        tensors.setdefault("replay_factor", moment_factor(cov, cov.shape[0]))
    d_in = int(tensors["basis"].shape[0]) if "basis" in tensors else 0
    empty = {"edit_keys": torch.zeros(0, d_in, dtype=torch.float16), "key_edit": torch.zeros(0, dtype=torch.long),
             "key_memory": torch.zeros(0, dtype=torch.long), "replay_factor": torch.zeros(0, 0),
             "replay_count": torch.zeros(())}
    for name, value in empty.items():  # before keys and replay
        tensors.setdefault(name, value)
    manifest["format_version"] = 2
    return manifest, tensors


def check_state(manifest: dict, tensors: dict[str, torch.Tensor], where: str) -> None:
    """The tensors as the side-memory layer will hold them: exactly its buffers, in their dtypes,
    shaped for the target, finite, with every index in range, and in step with the manifest.
    A state that cannot route is an error here, never the unedited model later."""
    from wisecli.runtime.memory import STATE_DTYPES

    def bad(message: str) -> CheckpointError:
        return CheckpointError(f"{where}: {message}", hint="the checkpoint is damaged; re-create it with wise edit")
    missing, extra = sorted(set(STATE_DTYPES) - set(tensors)), sorted(set(tensors) - set(STATE_DTYPES))
    if missing or extra:
        raise bad(f"tensor '{(missing or extra)[0]}' is {'missing' if missing else 'not one wise writes'}")
    for name, dtype in STATE_DTYPES.items():
        if tensors[name].dtype != dtype:
            raise bad(f"tensor '{name}' is {tensors[name].dtype}, expected {dtype}")
        if tensors[name].is_floating_point() and not bool(torch.isfinite(tensors[name]).all()):
            raise bad(f"tensor '{name}' holds NaN or Inf")
    for name, shape in _expected_shapes(manifest["target"], tensors).items():
        if tuple(tensors[name].shape) != shape:
            raise bad(f"tensor '{name}' has shape {list(tensors[name].shape)}, expected {list(shape)}")
    _check_indices(manifest, tensors, bad)


def _expected_shapes(target: dict, t: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    d_in, d_out = target["in_features"], target["out_features"]
    k, m = int(t["memories"].shape[0]) if t["memories"].dim() else -1, int(t["edit_keys"].shape[0])
    rank = int(t["basis"].shape[1]) if t["basis"].dim() == 2 else -1
    replay = int(t["replay_factor"].shape[1]) if t["replay_factor"].dim() == 2 else -1
    return {"memories": (k, d_out, d_in), "thresholds": (k,), "min_edit_scores": (k,), "scale": (),
            "basis": (d_in, max(rank, 0)) if rank <= d_in else (d_in, d_in), "edit_keys": (m, d_in),
            "key_edit": (m,), "key_memory": (m,), "replay_count": (),
            "replay_factor": (0, 0) if replay <= 0 and t["replay_factor"].numel() == 0 else (d_in, max(replay, 0))}


def _check_indices(manifest: dict, t: dict[str, torch.Tensor], bad: Any) -> None:
    k = int(t["memories"].shape[0])
    if float(t["scale"]) <= 0:
        raise bad("tensor 'scale' must be > 0")
    if t["key_memory"].numel() and not (0 <= int(t["key_memory"].min()) and int(t["key_memory"].max()) < k):
        raise bad(f"tensor 'key_memory' points outside the {k} side memories")
    if t["key_edit"].numel() and int(t["key_edit"].min()) < 0:
        raise bad("tensor 'key_edit' holds a negative edit number")
    if manifest["router"]["n_memories"] != k:
        raise bad(f"field 'router.n_memories' is {manifest['router']['n_memories']}, the tensors hold {k}")
    placed = [e.get("memory") for e in manifest["edits"]]
    if placed and k == 0:
        raise bad(f"{len(placed)} edits and no side memory: nothing could route to them")
    stray = next((i for i, m in enumerate(placed) if m is not None and not 0 <= m < k), None)
    if stray is not None:
        raise bad(f"field 'edits[{stray}].memory' is {placed[stray]}, the tensors hold memories 0..{k - 1}")


def config_of(manifest: dict) -> WiseConfig:
    return from_dict(manifest["config"], "wise.json")


def targets_of(manifest: dict) -> list[tuple[int, str]]:
    """(memory, new target) per edit, in edit order: what generation follows while it answers."""
    return [(int(e["memory"]), e["target_new"]) for e in manifest.get("edits", []) if e.get("memory") is not None]


def subjects_of(manifest: dict) -> list[tuple[int, str | None]]:
    """(memory, subject or None) per edit, in edit order: the subject gate's state."""
    return [(int(e["memory"]), e.get("subject")) for e in manifest.get("edits", [])
            if e.get("memory") is not None]


def describe(sess: "Session") -> dict:
    """The tool, the base model and the edited module."""
    t = sess.target
    prior = (sess.manifest or {}).get("base", {})
    base = {"origin": prior.get("origin", sess.origin), "model_type": t.model_type}
    if prior.get("alias", sess.alias):
        base["alias"] = prior.get("alias", sess.alias)
    return {
        "tool": {"name": "wise", "version": __version__, "torch": torch.__version__},
        "base": base,
        "target": {"module_path": t.module_path, "layer": t.layer, "n_layers": t.n_layers,
                   "kind": t.kind, "in_features": t.in_features, "out_features": t.out_features},
    }


def after_run(sess: "Session", cfg: WiseConfig, editor_state: dict, records: Sequence["EditRecord"],
              placed: list[dict], report: "EvalReport | None", edits_source: str, seconds: float) -> dict:
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
    mem = sess.mem
    return {
        **describe(sess),
        "mode": cfg.mode,
        "config": cfg.to_dict(),
        "router": {"scale": float(mem.scale), "thresholds": mem.thresholds.tolist(),
                   "min_edit_scores": mem.min_edit_scores.tolist(), "n_memories": mem.n_memories},
        "editor": editor_state,
        "edits": applied,
        "runs": list(prior.get("runs", [])) + [{
            "time": now, "edits_file": edits_source, "n_edits": len(records),
            "seconds": round(seconds, 2), "device": str(sess.device),
            "dtype": str(sess.dtype).replace("torch.", ""), "config": cfg.to_dict()}],
        "metrics": report.to_dict() if report else prior.get("metrics"),
    }


def metrics_summary(manifest: dict) -> dict[str, Any]:
    return {k: v for k, v in (manifest.get("metrics") or {}).items() if k != "edits"}
