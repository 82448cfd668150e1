"""Hyper-parameters of a WISE edit, as one frozen dataclass.

The fields are exactly the keys of the YAML file (``--config``): an unknown or
missing-typed key fails at once, naming the key, instead of being silently
ignored the way a mistyped option would be.  Presets per architecture only
change fields whose best value depends on the model's shape (the layer).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

MODES = ("merge", "retrieve")


@dataclass(frozen=True)
class WiseConfig:
    """Every knob of the method; all of them are recorded in the manifest."""

    mode: str = "merge"
    # Depth of the side memory as a fraction of the model's layers; ``layer`` wins when set.
    layer_fraction: float = 0.8
    layer: int | None = None
    # Knowledge sharding: edits trained together, each shard under its own mask.
    edits_per_shard: int = 10
    shards_per_merge: int = 2
    # Merge mode: a side memory takes merged shards until it holds this many edits, then a
    # new one opens and the key gate picks among them (the paper keeps several merged
    # memories for long runs).  0: one memory for every edit.  ZsRE T=1000 at wise edit's
    # defaults: one memory rel 0.708, gen 0.601, loc 0.985; 100 per memory 0.932 / 0.789 /
    # 0.991 (closest-key routing), 0.958 / 0.842 / 0.991 (coverage routing, the default).
    # T <= 100 is unchanged (one memory either way).
    edits_per_memory: int = 100
    mask_ratio: float = 0.2
    # TIES: keep this share of each shard delta's largest entries before sign election.
    # 1.0 keeps all: trimming a shard that was trained alone only weakens its edits.
    ties_density: float = 1.0
    # Weight of the existing side memory against the merged new shards.
    old_memory_weight: float = 1.0
    # Router: scores are in units of the layer's typical output norm (``scale``), so
    # the margins carry across model sizes instead of being tuned per model.
    act_ratio: float = 0.8
    # Activations kept per edit (its prompt's loudest tokens) to re-measure the threshold
    # after every merge; see SideMemoryLayer.edit_keys.  0 keeps none (threshold frozen).
    keys_per_edit: int = 4
    # Key gate: a memory answers a prompt only if one of the prompt's tokens has cosine
    # >= key_gate with one of the memory's keys (in the null-space-projected activations).
    # 0 turns it off.  See DESIGN.md "Key gate".
    key_gate: float = 0.85
    # Among the memories that pass: "coverage" picks the one holding the edit whose keys the
    # prompt matches best on average, "closest" the one with the single closest key.  See
    # maths.key_coverage.  ZsRE dev T=300 retrieve (30 memories, one trained state): rel
    # 0.991 -> 0.997, gen 0.856 -> 0.879, loc 1.000 both; ZsRE T=1000 merge (ten memories,
    # separate runs) avg 0.904 -> 0.930.  One memory: no difference.
    route_by: str = "coverage"
    # Which prompt tokens become keys: "loudest" (largest ‖D a_t‖) or "distinct" (the loudest
    # among tokens no near miss or irrelevant prompt matches at >= key_gate; see
    # maths.distinct_tokens; gemma3's preset).  Distinct keys: CounterFact dev T=100 loc 0.965 ->
    # 0.985, gemma3 other subjects left unchanged 0.890 -> 0.940, but smollm2 ZsRE dev T=100
    # (train negatives, whose questions then rule out relation words) gen 0.875 -> 0.840.
    key_choice: str = "loudest"
    # A memory also needs one of its edits covered: the mean, over that edit's keys, of each
    # key's best cosine with a prompt token at least this (0, or key_gate 0: off).  One
    # shared template word passes the key gate; a prompt about the edit matches most of
    # its keys.  One trained state each, only this varied (0 -> 0.6): CounterFact dev
    # T=100 loc 0.903 -> 0.965, rel 0.995 both; ZsRE dev T=100 unchanged (0.7 costs gen
    # 0.011).  See DESIGN.md "Key gate".
    coverage_gate: float = 0.6
    # Subject gate: a memory opens for a prompt that names one of its edits' subjects (the
    # edit's ``subject``, else the longest proper-noun span of its prompt; wise/subjects.py),
    # and the score threshold then decides.  It takes the key and coverage gates' place for
    # edits with a subject; keys still rank the open memories.  See DESIGN.md, "Subject gate".
    subject_gate: bool = True
    margin_irrelevant: float = 0.05   # alpha: irrelevant prompts stay below this
    margin_edit: float = 0.5          # beta: edit prompts rise above this
    margin_gap: float = 0.3           # gamma: edit minus irrelevant score
    margin_weight: float = 1.0
    # Replay (merge mode): each new group is trained to leave the memory's output on earlier
    # edits' activations as it was, a penalty replay_weight × mean ‖τ a‖² / scale² over
    # their tokens, kept as one d_in × d_in second-moment matrix.  0 turns it off.
    replay_weight: float = 10.0
    # Rank of the factor that stands for that matrix: exact up to d_in = replay_rank (both
    # models here); above, the best rank-r approximation (90 MB instead of 485 MB at d_in 11008).
    replay_rank: int = 2048
    # Optimisation of one shard.
    # SGD, not Adam: SGD's update is a sum of (gradient ⊗ activation) outer products, so
    # the side memory answers the edits' activations and stays small on everything
    # else; Adam moves every masked weight by ~lr and the memory then answers all inputs.
    optimizer: str = "sgd"
    # 5.0 since edits rest only with confidence to spare (learned_nll): ZsRE dev T=100 mean
    # steps per shard 54.5 at lr 4 -> 39.5 at lr 5, generalization 0.857 -> 0.881.
    learning_rate: float = 5.0
    # Heavy-ball momentum: rare multi-token targets (ZsRE's "Kohn Pedersen Fox") need
    # ~10x the plain-SGD step; momentum gets there without the instability of lr 30.
    # Measured on ZsRE dev, T=10: rel 0.60 -> 0.98 (50 steps), 1.00 with 80.
    momentum: float = 0.9
    max_steps: int = 80
    # An edit gets the cross-entropy until every row is right and its mean answer NLL is
    # below this; 0 would never let it rest, a large value stops it at the argmax boundary.
    learned_nll: float = 0.3
    min_steps: int = 5
    weight_decay: float = 0.0
    check_every: int = 5
    # Augmentation: random prefixes generated by the model itself.
    n_prefixes: int = 10
    # Copies of each edit's prompt with a word or two of its template left out (see
    # augment.reworded), drawn among the prefixed copies in each step.  0: none (gemma3's
    # preset: 4).
    n_rewordings: int = 0
    # Rows per edit in one step: the bare prompt plus this many minus one prefixed
    # copies, drawn afresh each step.  Every copy is seen over the run, at a
    # fraction of the cost of all of them in every step.
    variants_per_step: int = 3
    # ...but an edit's rows in one step stay within this many tokens: a long prompt (a
    # hallucination passage, ~180-token rows) trains on its bare prompt alone instead of three
    # copies, a third of the compute per step.  Rows up to 53 tokens keep all
    # variants_per_step: every ZsRE, CounterFact and KnowEdit shard (at most 50 measured).
    tokens_per_edit: int = 160
    prefix_lengths: tuple[int, ...] = (5, 10)
    # Irrelevant prompts for the router's margin loss.
    # Generated in several lengths: short ones look like prompts that await a fact,
    # which is what the router most needs to stay quiet on.  Irrelevant rows cost one
    # matmul per step (their activations are recorded), so all of them can be used.
    n_negatives: int = 60
    # Near misses per edit: its prompt about another subject (see augment.neighbours).
    n_neighbours: int = 4
    negatives_per_step: int = 60
    negative_lengths: tuple[int, ...] = (3, 6, 12)
    # How the router pools ‖D a_t‖ over the prompt: "max" or "mean" (the paper's).
    score_pooling: str = "max"
    # Directions of irrelevant text's activations that side memories ignore (0: none).
    null_space_rank: int = 128
    # Routing for free generation: decide from the prompt, hold for new tokens.
    hold_routing: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.mode in MODES, "mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        _check(0.0 < self.layer_fraction <= 1.0, "layer_fraction", "must be in (0, 1]")
        _check(self.layer is None or self.layer >= 0, "layer", "must be >= 0")
        for name in ("edits_per_shard", "shards_per_merge", "max_steps", "check_every", "n_negatives",
                     "variants_per_step", "tokens_per_edit"):
            _check(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("min_steps", "n_prefixes", "n_rewordings", "negatives_per_step", "n_neighbours", "null_space_rank",
                     "keys_per_edit", "replay_rank", "edits_per_memory"):
            _check(getattr(self, name) >= 0, name, "must be >= 0")
        _check(0.0 < self.mask_ratio <= 1.0, "mask_ratio", "must be in (0, 1]")
        _check(0.0 < self.ties_density <= 1.0, "ties_density", "must be in (0, 1]")
        _check(0.0 < self.act_ratio <= 1.0, "act_ratio", "must be in (0, 1]")
        _check(0.0 <= self.key_gate < 1.0, "key_gate", "must be in [0, 1)")
        _check(0.0 <= self.coverage_gate < 1.0, "coverage_gate", "must be in [0, 1)")
        _check(self.key_gate == 0 or self.keys_per_edit > 0, "key_gate", "needs keys_per_edit >= 1")
        _check(self.learning_rate > 0, "learning_rate", "must be > 0")
        _check(self.replay_weight >= 0, "replay_weight", "must be >= 0")
        _check(self.learned_nll > 0, "learned_nll", "must be > 0")
        _check(self.key_choice in ("loudest", "distinct"), "key_choice", "must be 'loudest' or 'distinct'")
        _check(self.route_by in ("coverage", "closest"), "route_by", "must be 'coverage' or 'closest'")
        _check(self.score_pooling in ("max", "mean"), "score_pooling", "must be 'max' or 'mean'")
        _check(self.optimizer in ("sgd", "adam"), "optimizer", "must be 'sgd' or 'adam'")
        _check(0.0 <= self.momentum < 1.0, "momentum", "must be in [0, 1)")
        _check(self.old_memory_weight >= 0, "old_memory_weight", "must be >= 0")
        _check(self.margin_edit > self.margin_irrelevant, "margin_edit",
               "must be larger than margin_irrelevant")
        for name in ("prefix_lengths", "negative_lengths"):
            lengths = getattr(self, name)
            _check(len(lengths) > 0 and all(n > 0 for n in lengths), name,
                   "must be a non-empty list of positive token counts")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["prefix_lengths"] = list(self.prefix_lengths)
        out["negative_lengths"] = list(self.negative_lengths)
        return out

    def replace(self, **changes: Any) -> "WiseConfig":
        return from_dict({**self.to_dict(), **{k: v for k, v in changes.items() if v is not None}})


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        err = ConfigError(f"config field '{name}': {message}")
        err.field = name  # so a caller that read a file can add the field's line
        raise err


# Presets per model_type: only what depends on the architecture.  The layer of the
# side memory is WISE's one architecture-specific choice (mid-to-late FFN).
PRESETS: dict[str, dict[str, Any]] = {
    "llama": {"layer_fraction": 0.8},
    "mistral": {"layer_fraction": 0.8},
    "qwen2": {"layer_fraction": 0.8},
    # Gemma normalises the FFN output (post_feedforward_layernorm), which amplifies a
    # delta's effect: a smaller step keeps nearby facts (locality 0.75 -> 0.88 on the demo).
    # gemma3: its 262k-token head makes steps large, so lr 1.0.  Momentum (the default) once
    # overshot locality (0.875 -> 0.625 on the real-model test); since the key gate holds
    # locality it is back: ZsRE dev T=100 rel 0.839 -> 0.971, gen 0.728 -> 0.764, loc 1.000.
    # lr 2.0 with learned_nll (as lr 3 -> 5 helped smollm2) did not: ZsRE dev T=100 rel 0.988 ->
    # 0.997, gen 0.806 -> 0.793, loc 1.000 -> 0.995.
    # Its depth was measured too (ZsRE dev T=100 rel / gen): layer 12 of 18 0.962 / 0.775,
    # 14 (0.8 x 18) 0.988 / 0.786, 16 0.892 / 0.714.
    # Reworded copies (n_rewordings 4) carry its rephrases further: ZsRE dev T=100 gen 0.786 ->
    # 0.827 (smollm2's fell 0.875 -> 0.853, so only here).  See DESIGN.md "Reworded copies".
    # Distinct keys win back the other-subject locality rewordings cost (0.890 -> 0.940, gen same).
    "gemma3_text": {"layer_fraction": 0.8, "learning_rate": 1.0, "n_rewordings": 4,
                    "key_choice": "distinct"},
    "gpt2": {"layer_fraction": 0.75},
    "gptj": {"layer_fraction": 0.75},
    "gpt_neox": {"layer_fraction": 0.75},
}


def _coerce(f: dataclasses.Field, value: Any, where: str) -> Any:
    """Check one YAML value against the field's declared type (YAML has no tuples)."""
    name, typ = f.name, str(f.type)
    if value is None and "None" in typ:
        return None
    if typ.startswith("tuple"):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) for v in value):
            raise ConfigError(f"{where}: field '{name}': expected a list of integers, got {value!r}")
        return tuple(value)
    if typ.startswith("bool"):
        ok = isinstance(value, bool)
    elif typ.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif typ.startswith("float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{where}: field '{name}': expected {typ}, got {type(value).__name__} {value!r}")
    return value


def from_dict(data: dict[str, Any], where: str = "config", lines: dict[str, int] | None = None) -> WiseConfig:
    """``lines``: each key's line in the file ``where``, so an error points at it."""
    lines = lines or {}

    def at(key: str) -> str:
        return f"{where}:{lines[key]}" if key in lines else where
    known = {f.name: f for f in fields(WiseConfig)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{at(unknown[0])}: unknown key '{unknown[0]}'",
                          hint=f"known keys: {', '.join(sorted(known))}")
    values = {k: _coerce(known[k], v, at(k)) for k, v in data.items()}
    try:
        return WiseConfig(**values)
    except ConfigError as exc:  # a value out of range: name the file (and line) it came from
        raise ConfigError(f"{at(getattr(exc, 'field', ''))}: {exc}", hint=exc.hint) from None


def _key_lines(text: str) -> dict[str, int]:
    """Line number of each top-level key of a YAML mapping."""
    out: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        m = re.match(r"([A-Za-z_][\w-]*)\s*:", line)
        if m:
            out.setdefault(m.group(1), number)
    return out


def load_config(path: str | Path | None, model_type: str | None = None,
                overrides: dict[str, Any] | None = None,
                base: dict[str, Any] | None = None) -> WiseConfig:
    """Defaults (or ``base``, a checkpoint's settings), then the architecture preset,
    then the YAML file, then CLI overrides."""
    data: dict[str, Any] = dict(base) if base is not None else dict(PRESETS.get(model_type or "", {}))
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        text = p.read_text(encoding="utf-8")
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of hyper-parameters at the top level")
        # validate the file's own keys with its name and their lines in the message
        from_dict(loaded, str(p), _key_lines(text))
        data.update(loaded)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_dict(data, str(path) if path else "config")
