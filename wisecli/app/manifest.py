"""``wise.json``: what the manifest of a patched checkpoint holds, and how older ones are read.

The file layout and its atomic write are in ``checkpoint.py``; this module owns the
manifest's content.  Its schema is ``wisecli/app/data/manifest.schema.json`` (JSON Schema, every
manifest read is validated against it); in short (format 6):

  format_version  6
  method          the editing method that wrote the state ("wise"; ``wisecli.methods``)
  tool            {name, version, torch}: what wrote it
  base            {origin, alias (when a built-in alias), model_type, path (where the base
                  weights are, relative to the checkpoint: "." when embedded), embedded,
                  files: {name: sha256}}
  target          {module_path, layer, n_layers, kind, in_features, out_features}
  mode            "merge" | "retrieve"
  config          every field of the method's config (WISE: WiseConfig, the settings the
                  memory was trained and is routed with)
  router          the method's summary of its tensors (WISE: scale, thresholds, min_edit_scores,
                  n_memories)
  editor          the method's JSON state (WISE: EditorState: prefixes, negatives, shards
                  trained, edits per memory)
  edits           one entry per edit ever applied: id, prompt, target_new, run, shard,
                  memory, subject, time
  runs            one entry per `wise edit` run: time, edits_file, n_edits, seconds, device,
                  dtype, config
  metrics         the last run's evaluation (or null)
  tensors         {name: {shape, dtype}} of wise.safetensors

Compatibility: a manifest of any older format is upgraded in ``upgrade`` (one step per
format version: 1 → 2 → … → 6) when it is read, so the rest of the code only ever sees the
current one.  A tensor state is checked by its method (``Method.check_state``).
"""
from __future__ import annotations

import copy
import json
from functools import lru_cache
from importlib import resources

import torch
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from wisecli import methods
from wisecli.errors import CheckpointError, ConfigError
from wisecli.runtime.maths import moment_factor

FORMAT_VERSION = 7

# Format 1 grew over releases: a setting added later is missing from the manifests written
# before it, and those checkpoints were routed as if it were off.
_V1_ABSENT_MEANS = {"key_gate": 0.0, "coverage_gate": 0.0, "subject_gate": False,
                    "score_pooling": "mean", "route_by": "closest"}


def upgrade(manifest: dict, tensors: dict[str, torch.Tensor], where: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Bring a manifest (already checked for its top-level shape) and its tensors to the
    current format; its config is validated as its method's on the way (errors name ``where``)."""
    manifest, tensors = copy.deepcopy(manifest), dict(tensors)
    if manifest["format_version"] == 1:
        manifest, tensors = _from_v1(manifest, tensors)
    if manifest["format_version"] == 2:
        manifest = _from_v2(manifest)
    if manifest["format_version"] == 3:
        manifest, tensors = _from_v3(manifest, tensors)
    if manifest["format_version"] == 4:
        manifest, tensors = _from_v4(manifest, tensors)
    if manifest["format_version"] == 5:
        manifest, tensors = _from_v5(manifest, tensors)
    if manifest["format_version"] == 6:
        manifest, tensors = _from_v6(manifest, tensors)
    validate(manifest, where)
    try:
        method = methods.get(manifest["method"])
        manifest["config"] = method.config_from_dict(manifest["config"], where).to_dict()
    except ConfigError as exc:
        raise ConfigError(f"{exc} (in 'config')", hint=exc.hint) from None
    return manifest, tensors


@lru_cache(maxsize=1)
def schema() -> dict:
    """The manifest's JSON Schema (the current format)."""
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


def _from_v2(manifest: dict) -> dict:
    """Format 2 → 3: the manifest names its editing method; every earlier one was WISE's."""
    manifest = {"format_version": 3, "method": "wise", **{k: v for k, v in manifest.items() if k != "format_version"}}
    return manifest


def _from_v3(manifest: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Format 3 → 4: WISE's state may now be stored in fewer bits (float16 memories and replay
    factor, float8 keys with ``key_exponents``: ``stored.stored_state``); a format-3 state is
    one such state already, in float32 and float16."""
    return {**manifest, "format_version": 4}, tensors


def _from_v4(manifest: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Format 4 → 5: WISE's edits may have answer keys (the router's answer gate).  A format-4
    state has none and was routed without the gate: its config says so, and it keeps routing
    (and, edited further, training) exactly as it did."""
    manifest = {**manifest, "format_version": 5}
    if manifest.get("method") == "wise":
        if isinstance(manifest.get("config"), dict):
            manifest["config"] = {**manifest["config"], "answer_gate": manifest["config"].get("answer_gate", 0.0)}
        d_in = int(tensors["basis"].shape[0]) if "basis" in tensors else 0
        tensors.setdefault("answer_keys", torch.zeros(0, d_in, dtype=torch.float16))
        tensors.setdefault("answer_key_edit", torch.zeros(0, dtype=torch.long))
    return manifest, tensors


def _from_v5(manifest: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Format 5 → 6: WISE's shards may write through random subspaces and be stored as their
    factors (``stored.memories_from_shards``).  A format-5 state's shards were masked: it has
    no factors, its config says so, and edited further it goes on training masked shards."""
    manifest = {**manifest, "format_version": 6}
    if manifest.get("method") == "wise":
        if isinstance(manifest.get("config"), dict):
            manifest["config"] = {**manifest["config"], "shard_rank": manifest["config"].get("shard_rank", 0)}
        d_out = int(tensors["memories"].shape[1]) if "memories" in tensors else 0
        tensors.setdefault("shard_factors", torch.zeros(0, d_out, 0, dtype=torch.float16))
        tensors.setdefault("shard_memory", torch.zeros(0, dtype=torch.long))
        tensors.setdefault("shard_seeds", torch.zeros(0, dtype=torch.long))
    return manifest, tensors


def _from_v6(manifest: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Format 6 → 7: WISE's edits may hold other keys (other relations of their subjects, which
    keep the answer gate shut).  A format-6 state has none and its config says so: it routes,
    and edited further trains, exactly as it did."""
    manifest = {**manifest, "format_version": 7}
    if manifest.get("method") == "wise":
        if isinstance(manifest.get("config"), dict):
            manifest["config"] = {**manifest["config"],
                                  "other_relations": manifest["config"].get("other_relations", 0)}
        d_in = int(tensors["basis"].shape[0]) if "basis" in tensors else 0
        tensors.setdefault("other_keys", torch.zeros(0, d_in, dtype=torch.float16))
        tensors.setdefault("other_key_edit", torch.zeros(0, dtype=torch.long))
    return manifest, tensors
