"""Edit records: our JSONL schema, and the JSON lists the field already uses (MEND ZsRE, EasyEdit
CounterFact / hallucination / temporal, KnowEdit, WikiBio) read as they are, so users need no conversion.
Every bad input is an ``InputError`` naming file, line (1-based record number in JSON lists) and field.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from wisecli.records import EditRecord, default_id
from wisecli.app.edit_formats import MAPPERS, first_text, list_format
from wisecli.errors import InputError

FORMATS = ("jsonl", "mend-zsre", "easyedit", "knowedit", "wikibio")
_OPTIONAL_STR = ("locality_prompt", "locality_ground_truth", "subject", "ground_truth", "question")
MAX_DEPTH = 64        # nesting of JSON values: no edit format nests deeper than a few levels
MAX_DIGITS = 100      # a number longer than this is no edit's data, and int() of 4300+ digits fails


def _jtype(value: Any) -> str:
    """The JSON name of a value's type, because users think in JSON, not Python."""
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _read_text(path: str | Path) -> tuple[Path, str]:
    """Read a whole file as UTF-8 (a BOM is tolerated), turning OS errors into InputError."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, "file not found")
    if p.is_dir():
        raise InputError(p, "is a directory, expected a file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise InputError(p, f"cannot read file: {exc.strerror}") from None
    try:
        return p, data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(p, f"not valid UTF-8 (byte 0x{data[exc.start]:02x})", line=line,
                         hint="save the file as UTF-8") from None


def _short(value: Any, n: int = 60) -> str:
    """A user's value inside a message: its repr, cut, so a message stays one line."""
    text = repr(value)
    return text if len(text) <= n else text[:n] + "…"


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_DIGITS:
        raise ValueError(f"a number of {len(digits)} digits")
    return int(digits)


def _loads(path: Path, text: str, line: int | None = None) -> Any:
    """json.loads with every way it can fail on hostile text turned into an InputError."""
    try:
        value = json.loads(text, parse_int=_bounded_int)
    except json.JSONDecodeError as exc:
        raise InputError(path, f"invalid JSON: {exc.msg} (column {exc.colno})",
                         line=line or exc.lineno) from None
    except RecursionError:
        raise InputError(path, f"invalid JSON: nested more than {MAX_DEPTH} levels deep", line=line) from None
    except ValueError as exc:
        raise InputError(path, f"invalid JSON: {exc}", line=line) from None
    if _depth(value) > MAX_DEPTH:
        raise InputError(path, f"invalid JSON: nested more than {MAX_DEPTH} levels deep", line=line)
    return value


def _depth(value: Any) -> int:
    """How deep lists and objects nest, without recursion (a deep value must not crash us)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, d = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, d)
            if d <= MAX_DEPTH:
                stack.extend((v, d + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _is_json_list(path: Path, text: str) -> bool:
    return path.suffix.lower() == ".json" or text.lstrip()[:1] == "["


def _parse_json_list(path: Path, text: str) -> list[Any]:
    """Parse a whole-file JSON list; syntax errors anywhere are reported, whatever the slice."""
    items = _loads(path, text)
    if not isinstance(items, list):
        raise InputError(path, f"expected a JSON list of records, got {_jtype(items)}",
                         hint="use .jsonl for one object per line")
    return items


def _jsonl_rows(path: Path, text: str) -> list[tuple[int, Any]]:
    """(line number, value) per non-blank line; split on "\\n" only, as JSON strings may hold raw U+2028."""
    rows = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        rows.append((lineno, _loads(path, line, lineno)))
    return rows


# --- our JSONL schema ---

def _check_str(path: Path, line: int, value: Any, field: str, label: str = "") -> str:
    """A non-blank string, or an InputError saying what came instead."""
    if not isinstance(value, str):
        raise InputError(path, f"{label}expected a string, got {_jtype(value)}", line=line, field=field)
    if not value.strip():
        raise InputError(path, f"{label}must not be empty", line=line, field=field)
    _check_unicode(path, line, value, field, label)
    return value


def _check_unicode(path: Path, line: int | None, value: str, field: str, label: str = "") -> None:
    """Text that cannot be written out (a lone surrogate such as "\\ud800") is no text."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(path, f"{label}not valid Unicode: an unpaired surrogate {value[exc.start]!r} "
                         f"at character {exc.start + 1}", line=line, field=field) from None


def _str_field(path: Path, line: int, obj: dict, key: str, *, required: bool) -> str | None:
    """JSON null counts as absent, so exports with explicit nulls for optional fields load."""
    if obj.get(key) is None:
        if required:
            raise InputError(path, "missing required field", line=line, field=key)
        return None
    return _check_str(path, line, obj[key], key)


def _rephrase_field(path: Path, line: int, value: Any) -> tuple[str, ...]:
    """``rephrase`` may be one string or a list of them; always a tuple afterwards."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise InputError(path, f"expected a string or a list of strings, got {_jtype(value)}",
                         line=line, field="rephrase")
    return tuple(_check_str(path, line, item, "rephrase", f"entry {i}: ") for i, item in enumerate(items, 1))


def _portability_field(path: Path, line: int, value: Any) -> tuple[tuple[str, str], ...]:
    """List of {"prompt", "ground_truth"|"answer"} objects or [prompt, answer] pairs."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InputError(path, f"expected a list, got {_jtype(value)}", line=line, field="portability")
    pairs = []
    for i, item in enumerate(value, 1):
        if isinstance(item, dict):
            pair = (item.get("prompt"), first_text(item.get("ground_truth", item.get("answer"))))
        else:
            pair = tuple(item) if isinstance(item, list) and len(item) == 2 else (None, None)
        if not all(isinstance(s, str) and s.strip() for s in pair):
            raise InputError(path, f"entry {i}: expected {{\"prompt\", \"ground_truth\"}} or [prompt, answer] "
                             f"with non-empty strings, got {json.dumps(item)[:60]}", line=line, field="portability")
        for text in pair:
            _check_unicode(path, line, text, "portability", f"entry {i}: ")
        pairs.append(pair)
    return tuple(pairs)


def _from_jsonl(path: Path, line: int, obj: Any) -> EditRecord:
    """Validate one line of our schema; unknown keys are ignored so files can carry notes."""
    if not isinstance(obj, dict):
        raise InputError(path, f"expected a JSON object, got {_jtype(obj)}", line=line)
    prompt = _str_field(path, line, obj, "prompt", required=True)
    target = _str_field(path, line, obj, "target_new", required=True)
    rid = _str_field(path, line, obj, "id", required=False) or default_id(prompt, target)
    extra = {k: _str_field(path, line, obj, k, required=False) for k in _OPTIONAL_STR}
    if extra["locality_ground_truth"] and not extra["locality_prompt"]:
        raise InputError(path, "given without 'locality_prompt'", line=line, field="locality_ground_truth")
    return EditRecord(id=rid, prompt=prompt, target_new=target,
                      rephrase=_rephrase_field(path, line, obj.get("rephrase")),
                      portability=_portability_field(path, line, obj.get("portability")),
                      same_subject=_same_subject_field(path, line, obj.get("same_subject")),
                      source=f"{path}:{line}", **extra)


def _same_subject_field(path: Path, line: int, value: Any) -> tuple[tuple[str, str | None], ...]:
    """A list of prompts, or of {"prompt", "ground_truth"|"answer"} objects."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InputError(path, f"expected a list, got {_jtype(value)}", line=line, field="same_subject")
    out = []
    for i, item in enumerate(value, 1):
        prompt = item.get("prompt") if isinstance(item, dict) else item
        answer = first_text(item.get("ground_truth", item.get("answer"))) if isinstance(item, dict) else None
        out.append((_check_str(path, line, prompt, "same_subject", f"entry {i}: "),
                    None if answer is None else _check_str(path, line, answer, "same_subject", f"entry {i}: ")))
    return tuple(out)


def _edits_from_rows(path: Path, rows: list[tuple[int, Any]], offset: int, limit: int | None) -> list[EditRecord]:
    """Validate only the selected lines; a duplicate id names the line that used it first."""
    stop = None if limit is None else offset + limit
    records, first_line = [], {}
    for line, obj in rows[offset:stop]:
        rec = _from_jsonl(path, line, obj)
        if rec.id in first_line:
            raise InputError(path, f"duplicate id {_short(rec.id)} (first used on line {first_line[rec.id]})",
                             line=line, field="id")
        first_line[rec.id] = line
        records.append(rec)
    return records


# --- EasyEdit-family JSON lists (mapped by edit_formats) ---

def _detect_list(path: Path, items: list[Any]) -> str:
    """The first record decides, as the field's files are uniform; an unknown one lists the keys it has."""
    if not items:
        raise InputError(path, "no edit records found")
    fmt = list_format(items[0])
    if fmt is None:
        got = ", ".join(sorted(items[0])) if isinstance(items[0], dict) else _jtype(items[0])
        raise InputError(path, f"unrecognised edit format: record #1 has {got or 'no keys'}", line=1,
                         hint="expected src/alt (MEND ZsRE), prompt/target_new (EasyEdit, KnowEdit) "
                              "or text/labels (WikiBio)")
    return fmt


def _from_list_item(path: Path, fmt: str, index: int, raw: Any) -> EditRecord:
    """Map one benchmark record; errors name the file's own keys (src/alt, text/labels) the user can find."""
    mapper, pkey, tkey = MAPPERS[fmt]
    if not isinstance(raw, dict):
        raise InputError(path, f"record #{index}: expected a JSON object, got {_jtype(raw)}", line=index)
    fields = mapper(raw)
    for name, key in (("prompt", pkey), ("target_new", tkey)):
        if not fields[name]:
            raise InputError(path, f"record #{index} has no usable value (expected a non-empty string)",
                             line=index, field=key, hint="fix the record, or select a range without it (offset/limit)")
    for name, value in fields.items():
        for text in _strings(value):
            _check_unicode(path, index, text, name, f"record #{index}: ")
    if not fields.get("locality_prompt"):
        fields["locality_ground_truth"] = None  # an answer without its prompt can be neither scored nor routed
    case_id = raw.get("case_id")  # CounterFact's own id, so results cross-reference published cases
    rid = f"case-{case_id}" if isinstance(case_id, (int, str)) and not isinstance(case_id, bool) \
        else default_id(fields["prompt"], fields["target_new"])
    return EditRecord(id=rid, source=f"{path}:#{index}", **fields)


def _strings(value: Any) -> list[str]:
    """The strings of a mapped field (a string, or tuples of them)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, tuple):
        return [s for v in value for s in _strings(v)]
    return []


def _edits_from_list(path: Path, items: list[Any], offset: int, limit: int | None) -> list[EditRecord]:
    """Benchmarks repeat some (prompt, target) pairs; they are read as they are, with -2, -3 id suffixes."""
    fmt = _detect_list(path, items)
    stop = None if limit is None else offset + limit
    records, seen = [], {}
    for index, raw in enumerate(items[offset:stop], offset + 1):
        rec = _from_list_item(path, fmt, index, raw)
        seen[rec.id] = seen.get(rec.id, 0) + 1
        records.append(rec if seen[rec.id] == 1 else replace(rec, id=f"{rec.id}-{seen[rec.id]}"))
    return records


# --- public API ---

def detect_format(path: Path) -> str:
    """One of FORMATS, so commands can tell the user what they are reading."""
    p, text = _read_text(path)
    return _detect_list(p, _parse_json_list(p, text)) if _is_json_list(p, text) else "jsonl"


def load_edits(path: str | Path, *, offset: int = 0, limit: int | None = None) -> list[EditRecord]:
    """Read and validate edit records ``[offset, offset + limit)`` from any supported format."""
    p, text = _read_text(path)
    for name, value in (("offset", offset), ("limit", limit)):
        if value is not None and value < 0:
            raise InputError(p, f"must be >= 0, got {value}", field=name)
    if _is_json_list(p, text):
        items = _parse_json_list(p, text)
        total, records = len(items), _edits_from_list(p, items, offset, limit)
    else:
        rows = _jsonl_rows(p, text)
        if not rows:
            raise InputError(p, "no edit records found")
        total, records = len(rows), _edits_from_rows(p, rows, offset, limit)
    if not records:
        raise InputError(p, f"no edit records in the selected range (offset {offset}, limit {limit}); "
                            f"the file has {total}")
    return records


def _prompt_item(path: Path, line: int, item: Any, label: str) -> str:
    """A prompt-list entry: a string, or an object with ``prompt`` or ``text``."""
    if isinstance(item, dict) and item.get("prompt", item.get("text")) is None:
        raise InputError(path, f"{label}object has neither 'prompt' nor 'text'", line=line, field="prompt")
    value = item.get("prompt", item.get("text")) if isinstance(item, dict) else item
    return _check_str(path, line, value, "prompt", label)


def _negatives(pairs: list[tuple[str | None, str | None]]) -> list[str]:
    """Locality prompts are known to be unrelated to the edits; a file without any gives its prompts."""
    return [loc for loc, _ in pairs if loc] or [prompt for _, prompt in pairs if prompt]


def load_prompts(path: str | Path) -> list[str]:
    """Irrelevant (router-negative) prompts from a .txt, a prompt list or any edit file."""
    p, text = _read_text(path)
    if p.suffix.lower() == ".txt":
        prompts = [line.strip() for line in text.split("\n") if line.strip()]
    elif _is_json_list(p, text):
        items = _parse_json_list(p, text)
        fmt = list_format(items[0]) if items else None
        if fmt:  # read leniently: a record with no target (ZsRE train has two) still has a `loc`
            mapped = [MAPPERS[fmt][0](r) for r in items if isinstance(r, dict)]
            prompts = _negatives([(m.get("locality_prompt"), m["prompt"]) for m in mapped])
        else:
            prompts = [_prompt_item(p, i, item, f"record #{i}: ") for i, item in enumerate(items, 1)]
    else:
        rows = _jsonl_rows(p, text)
        if rows and isinstance(rows[0][1], dict) and "target_new" in rows[0][1]:
            prompts = _negatives([(r.locality_prompt, r.prompt) for r in _edits_from_rows(p, rows, 0, None)])
        else:
            prompts = [_prompt_item(p, line, obj, "") for line, obj in rows]
    if not prompts:
        raise InputError(p, "no prompts found")
    return prompts


def record_to_json(rec: EditRecord) -> dict:
    """Our JSONL schema for a record (None/empty fields dropped), so any format can be re-saved as JSONL."""
    out: dict[str, Any] = {"id": rec.id, "prompt": rec.prompt, "target_new": rec.target_new}
    if rec.rephrase:
        out["rephrase"] = list(rec.rephrase)
    out.update({k: getattr(rec, k) for k in _OPTIONAL_STR if getattr(rec, k) is not None})
    if rec.portability:
        out["portability"] = [{"prompt": q, "ground_truth": a} for q, a in rec.portability]
    if rec.same_subject:
        out["same_subject"] = [{"prompt": q, "ground_truth": a} if a else q for q, a in rec.same_subject]
    return out
