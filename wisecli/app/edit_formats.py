"""The field's benchmark files, mapped onto our edit fields: MEND ZsRE, EasyEdit (CounterFact,
hallucination, temporal), KnowEdit and WikiBio, read as they are so users need no conversion.

Plain dict-to-dict functions; checking the values and building ``EditRecord``s is ``edits.py``'s.
"""
from __future__ import annotations

from typing import Any, Callable


def first_text(value: Any) -> str | None:
    """First non-blank string in a string or (nested) list of them. Answers come as lists of accepted
    aliases (ZsRE ``answers``, KnowEdit ``[["USSR", "Soviet Union"]]``); the first is the canonical one."""
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, list):
        return next((s for s in map(first_text, value) if s is not None), None)
    return None


def _all(*values: Any) -> tuple[str, ...]:
    """Every non-blank string: each rephrase is a separate generalization probe, so keep all."""
    out: list[str] = []
    for value in values:
        if isinstance(value, str) and value.strip():
            out.append(value)
        elif isinstance(value, list):
            out.extend(_all(*value))
    return tuple(out)


def _text(value: Any) -> str | None:
    """A passage given as a list of pieces (WikiBio) is one passage: join rather than truncate."""
    return (" ".join(_all(value)) or None) if isinstance(value, list) else first_text(value)


def _qa_entries(groups: Any) -> list[tuple[str, str]]:
    """Usable (prompt, answer) pairs from KnowEdit's {"Category": [{"prompt", "ground_truth"}, ...]},
    in file order (which puts Relation_Specificity before Forgetfulness)."""
    pairs = []
    for entries in groups.values() if isinstance(groups, dict) else ():
        for entry in entries if isinstance(entries, list) else ():
            if isinstance(entry, dict) and first_text(entry.get("prompt")) and first_text(entry.get("ground_truth")):
                pairs.append((first_text(entry["prompt"]), first_text(entry["ground_truth"])))
    return pairs


def _knowedit_locality(locality: Any) -> dict[str, Any]:
    """One locality probe per record, as in EasyEdit's own KnowEdit runs: the first usable entry;
    the Relation_Specificity entries (the subject's other relations) are its same-subject probes."""
    pairs = _qa_entries(locality)
    same = _qa_entries({"r": locality.get("Relation_Specificity")}) if isinstance(locality, dict) else []
    return ({"locality_prompt": pairs[0][0], "locality_ground_truth": pairs[0][1]} if pairs else {}) | \
        ({"same_subject": tuple(same)} if same else {})


def map_mend(r: dict) -> dict[str, Any]:
    """MEND ZsRE; ``portability`` is one GPT-4 question {"New Question", "New Answer", ...}."""
    port = r.get("portability") if isinstance(r.get("portability"), dict) else {}
    q, a = first_text(port.get("New Question")), first_text(port.get("New Answer"))
    return dict(prompt=first_text(r.get("src")), target_new=first_text(r.get("alt")), rephrase=_all(r.get("rephrase")),
                locality_prompt=first_text(r.get("loc")), locality_ground_truth=first_text(r.get("loc_ans")),
                subject=first_text(r.get("subject")), ground_truth=first_text(r.get("answers")),
                portability=((q, a),) if q and a else ())


def map_easyedit(r: dict) -> dict[str, Any]:
    """EasyEdit (CounterFact, hallucination, temporal) and KnowEdit, which nests locality and portability.
    Temporal's ``ood_rephrase`` is one more rephrase: it probes the same edit out of distribution."""
    flat = dict(prompt=first_text(r.get("prompt")), target_new=first_text(r.get("target_new")),
                rephrase=_all(r.get("rephrase_prompt"), r.get("ood_rephrase")), subject=first_text(r.get("subject")),
                ground_truth=first_text(r.get("ground_truth")), portability=tuple(_qa_entries(r.get("portability"))),
                locality_prompt=first_text(r.get("locality_prompt")),
                locality_ground_truth=first_text(r.get("locality_ground_truth")))
    return {**flat, **_knowedit_locality(r.get("locality"))}


def map_wikibio(r: dict) -> dict[str, Any]:
    """KnowEdit WikiBio: a passage (``text``) continued by ``labels``, about ``concept``."""
    return dict(prompt=_text(r.get("text")), target_new=_text(r.get("labels")), subject=first_text(r.get("concept")),
                **_knowedit_locality(r.get("locality")))


# format -> (mapper, source key of the prompt, source key of the target)
MAPPERS: dict[str, tuple[Callable[[dict], dict[str, Any]], str, str]] = {
    "mend-zsre": (map_mend, "src", "alt"),
    "easyedit": (map_easyedit, "prompt", "target_new"),
    "knowedit": (map_easyedit, "prompt", "target_new"),
    "wikibio": (map_wikibio, "text", "labels"),
}


def list_format(first: Any) -> str | None:
    """Name the JSON-list format from the first record's keys, or None if it is no edit format."""
    if not isinstance(first, dict):
        return None
    if "src" in first and "alt" in first:
        return "mend-zsre"
    if "text" in first and "labels" in first:
        return "wikibio"
    if "prompt" in first and "target_new" in first:
        nested = isinstance(first.get("locality"), dict) or isinstance(first.get("portability"), dict)
        return "knowedit" if nested else "easyedit"
    return None
