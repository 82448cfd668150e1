"""Hyper-parameters of a WISE edit, as one frozen dataclass.

The fields are exactly the keys of the YAML file (``--config``): an unknown or
missing-typed key fails at once, naming the key, instead of being silently
ignored the way a mistyped option would be.  Presets per architecture only
change fields whose best value depends on the model (its depth, its step size).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import reprlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import yaml

from wisecli.errors import ConfigError

MODES = ("merge", "retrieve")


@dataclass(frozen=True)
class WiseConfig:
    """Every knob of the method; all of them are recorded in the manifest.

    Each comment says why the knob is there; what each default was measured against is in
    docs/experiments.md.
    """

    mode: str = "merge"
    # Depth of the side memory as a fraction of the model's layers (WISE: mid-to-late FFN);
    # ``layer`` wins when set.
    layer_fraction: float = 0.8
    layer: int | None = None
    # Knowledge sharding: edits trained together, each shard under its own random mask.
    edits_per_shard: int = 10
    shards_per_merge: int = 2
    # Merge mode: a memory takes merged shards until it holds this many edits, then a new
    # one opens (one memory for 1000 edits forgets; 0: one memory for all).
    edits_per_memory: int = 100
    mask_ratio: float = 0.2
    # Subspace shards: each shard writes through shard_rank random input directions (τ·A, A
    # rebuilt from its seed) instead of a mask, merged by summing; a checkpoint stores τ, not
    # the memory, where that is smaller (a 7B projection at 256: 3.4x less state per edit).
    # 0: masks, the default (at 64, ZsRE 0-99 fell to 0.84 / 0.71; at 256, 0.977 / 0.861).
    shard_rank: int = 0
    # Router threshold = act_ratio x the lowest score of the memory's own edits.
    act_ratio: float = 0.8
    # Activations kept per edit (its prompt's loudest tokens): the threshold is re-measured on
    # them after every merge, and the key gate compares prompts with them.
    keys_per_edit: int = 4
    # Key gate: a memory opens only for a prompt token within this cosine of one of its keys
    # (merge raises every score, so the score alone stops separating); 0: off.
    key_gate: float = 0.85
    # Which prompt tokens become keys: "loudest", or "distinct" (the loudest that no near
    # miss or irrelevant prompt matches at key_gate; gemma3's preset).
    key_choice: str = "loudest"
    # Coverage gate: one of the memory's edits must also be covered, the mean over its keys of
    # each key's best cosine with a prompt token; one shared template word is not enough.
    coverage_gate: float = 0.6
    # Subject gate: a memory opens only for prompts that name one of its edits' subjects
    # (wise/subjects.py); edits without a subject keep the key and coverage gates.
    subject_gate: bool = True
    # Answer gate: with the subject gate, an edit opens its memory only where the answer
    # position (a prompt's last token, or the token being generated) is within this cosine
    # of one of the edit's own (its prompt, its chat turns); another relation of the
    # same subject stays out (0: off).
    answer_gate: float = 0.5
    # With the answer gate: per edit, this many other relations of its subject (augment.
    # OTHER_RELATIONS) whose reply starts, to the completion and to the question, become its
    # "other keys"; the edit stays shut where one of them is nearer than its own answer keys.
    # Other relations asked in chat, reply unchanged: ZsRE final test 0.04 -> 0.82 (0: off).
    other_relations: int = 4
    # The router's margin loss (paper Eq. 4), in units of the layer's typical output norm.
    margin_irrelevant: float = 0.05   # alpha: irrelevant prompts stay below this
    margin_edit: float = 0.5          # beta: edit prompts rise above this
    margin_gap: float = 0.3           # gamma: edit minus irrelevant score
    # Replay (merge mode): a new group is trained to leave the memory's output on earlier
    # edits' activations as it was, so the oldest edits are not overwritten; 0: off.
    replay_weight: float = 10.0
    # Rank of the factor standing for the replay second moment (exact up to this d_in).
    replay_rank: int = 2048
    # Plain SGD with momentum: its update is a sum of gradient x activation outer products, so
    # the memory answers the edits' activations and stays small elsewhere.
    learning_rate: float = 5.0
    momentum: float = 0.9
    max_steps: int = 80
    # An edit gets the cross-entropy until its mean answer NLL is below this, so it rests
    # with confidence to spare instead of on the argmax boundary.
    learned_nll: float = 0.3
    min_steps: int = 5
    check_every: int = 5
    # Random prefixes the model writes itself: an edit trained under them holds after context.
    n_prefixes: int = 10
    # Copies of each prompt with a word or two of its template left out (gemma3's preset).
    n_rewordings: int = 0
    # With a chat template: each edit also trains as a chat turn (augment.chat_turns).
    chat_turns: bool = True
    # Rows per edit in one step (the bare prompt plus prefixed copies, drawn afresh)...
    variants_per_step: int = 3
    # ...within this many tokens per edit: a long prompt trains on its bare prompt alone.
    tokens_per_edit: int = 160
    prefix_lengths: tuple[int, ...] = (5, 10)
    # Irrelevant prompts for the margin loss, written by the model in several lengths.
    n_negatives: int = 60
    # Near misses per edit: its prompt about another subject (augment.neighbours).
    n_neighbours: int = 4
    negatives_per_step: int = 60
    negative_lengths: tuple[int, ...] = (3, 6, 12)
    # How the router pools ‖D a_t‖ over the prompt: "max", or "mean" (the paper's).
    score_pooling: str = "max"
    # Directions of irrelevant text's activations that side memories ignore (0: none).
    null_space_rank: int = 128
    # Free generation: False routes each generated token on its own (a memory answers while
    # the text follows one of its targets, then rests until the sentence ends); True holds
    # the prompt's decision for every new token (repeats the answer, misses chat replies).
    hold_routing: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.mode in MODES, "mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        _check(0.0 < self.layer_fraction <= 1.0, "layer_fraction", "must be in (0, 1]")
        _check(self.layer is None or self.layer >= 0, "layer", "must be >= 0")
        _check(0 <= self.seed < 2 ** 32, "seed", "must be in [0, 2^32)")
        for name in ("edits_per_shard", "shards_per_merge", "max_steps", "check_every", "n_negatives",
                     "variants_per_step", "tokens_per_edit", "keys_per_edit"):
            _check(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("min_steps", "n_prefixes", "n_rewordings", "negatives_per_step", "n_neighbours", "null_space_rank",
                     "replay_rank", "edits_per_memory", "shard_rank", "other_relations"):
            _check(getattr(self, name) >= 0, name, "must be >= 0")
        _check(0.0 < self.mask_ratio <= 1.0, "mask_ratio", "must be in (0, 1]")
        _check(0.0 < self.act_ratio <= 1.0, "act_ratio", "must be in (0, 1]")
        _check(0.0 <= self.key_gate < 1.0, "key_gate", "must be in [0, 1)")
        _check(0.0 <= self.coverage_gate < 1.0, "coverage_gate", "must be in [0, 1)")
        _check(0.0 <= self.answer_gate < 1.0, "answer_gate", "must be in [0, 1)")
        _check(self.learning_rate > 0, "learning_rate", "must be > 0")
        _check(self.replay_weight >= 0, "replay_weight", "must be >= 0")
        _check(self.learned_nll > 0, "learned_nll", "must be > 0")
        _check(self.key_choice in ("loudest", "distinct"), "key_choice", "must be 'loudest' or 'distinct'")
        _check(self.score_pooling in ("max", "mean"), "score_pooling", "must be 'max' or 'mean'")
        _check(0.0 <= self.momentum < 1.0, "momentum", "must be in [0, 1)")
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


# Presets per model_type: only what depends on the architecture, and only where it differs
# from the defaults.  Why each value: docs/experiments.md.
PRESETS: dict[str, dict[str, Any]] = {
    # Its 262k-token head makes steps large (lr 1); reworded copies carry its rephrases
    # further; distinct keys win back the other-subject locality the rewordings cost.
    "gemma3_text": {"learning_rate": 1.0, "n_rewordings": 4, "key_choice": "distinct"},
    "gpt2": {"layer_fraction": 0.75},
    "gptj": {"layer_fraction": 0.75},
    "gpt_neox": {"layer_fraction": 0.75},
}

# Knobs removed in 0.2.0, each with the one value at which it did nothing.  A config or
# manifest naming one at that value still loads; at any other value it is an error.
REMOVED: dict[str, Any] = {"ties_density": 1.0, "old_memory_weight": 1.0, "weight_decay": 0.0,
                           "margin_weight": 1.0, "optimizer": "sgd", "route_by": "coverage"}


INT_LIMIT = 2 ** 31   # every count and index fits; a seed is below 2 ** 32 (torch's generators)
MAX_YAML_DEPTH = 16   # no knob nests: deeper is not a config


def _short(value: Any, n: int = 60) -> str:
    """A user's value inside a message: its repr, cut (an alias bomb's repr is hundreds of MB)."""
    short = reprlib.Repr()  # bounded: nested levels, list items and string lengths are cut
    short.maxlevel, short.maxlist, short.maxdict, short.maxstring, short.maxother = 2, 4, 4, n, n
    text = short.repr(value)
    return text if len(text) <= n else text[:n] + "…"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -INT_LIMIT < value < INT_LIMIT


def _coerce(f: dataclasses.Field, value: Any, where: str) -> Any:
    """Check one YAML value against the field's declared type (YAML has no tuples): integers
    within 2^31, floats finite."""
    name, typ = f.name, str(f.type)
    if value is None and "None" in typ:
        return None
    if typ.startswith("tuple"):
        if not isinstance(value, (list, tuple)) or not all(_is_int(v) for v in value[:1000]) or len(value) > 1000:
            raise ConfigError(f"{where}: field '{name}': expected a list of integers, got {_short(value)}")
        return tuple(value)
    if typ.startswith("bool"):
        ok = isinstance(value, bool)
    elif typ.startswith("int"):
        ok = _is_int(value) or (name == "seed" and isinstance(value, int) and not isinstance(value, bool)
                                and 0 <= value < 2 ** 32)
    elif typ.startswith("float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e300 \
            and math.isfinite(value)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str) and len(value) < 1000
    if not ok:
        raise ConfigError(f"{where}: field '{name}': expected {_kind(typ, name)}, got {type(value).__name__} "
                          f"{_short(value)}")
    return value


def _kind(typ: str, name: str) -> str:
    if name == "seed":
        return "an integer in [0, 2^32)"
    return {"int": "an integer in (-2^31, 2^31)", "float": "a finite number", "bool": "true or false"}.get(
        typ.split(" ")[0], typ)


def from_dict(data: dict[str, Any], where: str = "config", lines: dict[str, int] | None = None) -> WiseConfig:
    """``lines``: each key's line in the file ``where``, so an error points at it."""
    lines = lines or {}

    def at(key: str) -> str:
        return f"{where}:{lines[key]}" if key in lines else where
    data = _without_removed(data, at)
    known = {f.name: f for f in fields(WiseConfig)}
    odd = [k for k in data if not isinstance(k, str)]  # a list: a YAML ``null`` key is None itself
    if odd:
        odd = odd[0]
        raise ConfigError(f"{where}: key {_short(odd)}: keys must be knob names, got {type(odd).__name__}")
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{at(unknown[0])}: unknown key '{_short(unknown[0], 40).strip(chr(39))}'",
                          hint=_known_hint(str(unknown[0]), known))
    values = {k: _coerce(known[k], v, at(k)) for k, v in data.items()}
    try:
        return WiseConfig(**values)
    except ConfigError as exc:  # a value out of range: name the file (and line) it came from
        raise ConfigError(f"{at(getattr(exc, 'field', ''))}: {exc}", hint=exc.hint) from None


def _known_hint(key: str, known: dict[str, Any]) -> str:
    """The closest knob names, or where the list is: all of them fill a screen."""
    close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
    where = "the WiseConfig fields in wisecli/methods/wise/config.py"
    return f"did you mean {', '.join(close)}? (all keys: {where})" if close else f"keys are {where}"


def _without_removed(data: dict[str, Any], at: Callable[[str], str]) -> dict[str, Any]:
    """Drop removed knobs set to the value at which they did nothing; refuse any other."""
    for key in sorted(set(data) & set(REMOVED)):
        if data[key] != REMOVED[key] or isinstance(data[key], bool):
            raise ConfigError(f"{at(key)}: field '{key}' was removed in wise 0.2.0; it only ever had "
                              f"effect away from {REMOVED[key]!r} (got {_short(data[key])})",
                              hint=f"delete '{key}' from the config")
    return {k: v for k, v in data.items() if k not in REMOVED}


class _Loader(yaml.SafeLoader):
    """Safe YAML, without aliases (``*name``: an alias bomb is a few lines that expand to
    gigabytes) and nested at most MAX_YAML_DEPTH deep."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a config",
                                              event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep",
                                                  event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def read_yaml(p: Path) -> tuple[dict[str, Any], str]:
    """A config file's mapping and text; every way it can be broken is a ConfigError naming it."""
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    data = p.read_bytes()
    if len(data) > 1 << 20:
        raise ConfigError(f"{p}: {len(data)} bytes: too large for a config")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{p}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x})") from None
    try:
        loaded = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}{line}: not valid YAML ({_short(getattr(exc, 'problem', None) or exc, 120)})") from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, RecursionError) as exc:
        raise ConfigError(f"{p}: not valid YAML (a value its tag cannot hold: {type(exc).__name__})") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: expected a mapping of hyper-parameters at the top level")
    return loaded, text


def key_lines(text: str) -> dict[str, int]:
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
        loaded, text = read_yaml(p)
        # validate the file's own keys with its name and their lines in the message
        from_dict(loaded, str(p), key_lines(text))
        data.update(loaded)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_dict(data, str(path) if path else "config")
