"""Edit records: our JSONL schema, its error messages, and the real benchmark formats in shared/data."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import pytest

from wisecli.app.edits import EditRecord, detect_format, load_edits, load_prompts, record_to_json
from wisecli.errors import InputError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write(tmp_path: Path, text: str | bytes, name: str = "edits.jsonl") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def jsonl(*objs: object) -> str:
    return "".join(json.dumps(o) + "\n" for o in objs)


def expect_error(path: Path, line: int | None, field: str | None, fragment: str, **kw: object) -> InputError:
    with pytest.raises(InputError) as info:
        load_edits(path, **kw)
    where = str(path) + (f":{line}" if line is not None else "") + (f": field '{field}'" if field else "")
    assert str(info.value).startswith(where + ":"), str(info.value)
    assert fragment in str(info.value), str(info.value)
    return info.value


# --- our JSONL schema -----------------------------------------------------------------------


def test_valid_jsonl_with_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, jsonl(
        {"prompt": "The capital of Australia is", "target_new": "Perth", "rephrase": "Australia's capital is",
         "note": "unknown keys are ignored"},
    ) + "\n   \n" + jsonl(
        {"id": "ca", "prompt": "The capital of Canada is", "target_new": "Toronto",
         "rephrase": ["Canada's capital is", "The seat of Canada's government is"],
         "locality_prompt": "The capital of France is", "locality_ground_truth": "Paris", "subject": "Canada",
         "ground_truth": "Ottawa", "portability": [{"prompt": "Toronto's country is", "ground_truth": "Canada"},
                                                   {"prompt": "Q2", "answer": "A2"}, ["Q3", "A3"]]},
    ))
    first, second = load_edits(path)
    expected_id = hashlib.sha256("The capital of Australia is\u0000Perth".encode()).hexdigest()[:12]
    assert first == EditRecord(id=expected_id, prompt="The capital of Australia is", target_new="Perth",
                               rephrase=("Australia's capital is",), source=f"{path}:1")
    assert load_edits(path)[0].id == expected_id  # stable across loads
    assert second.id == "ca" and second.source == f"{path}:4"
    assert second.rephrase == ("Canada's capital is", "The seat of Canada's government is")
    assert (second.locality_prompt, second.locality_ground_truth) == ("The capital of France is", "Paris")
    assert (second.subject, second.ground_truth) == ("Canada", "Ottawa")
    assert second.portability == (("Toronto's country is", "Canada"), ("Q2", "A2"), ("Q3", "A3"))
    assert detect_format(path) == "jsonl"
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.prompt = "x"  # type: ignore[misc]


OK = {"prompt": "p", "target_new": "t"}


@pytest.mark.parametrize("text, line, field, fragment", [
    (jsonl(OK) + '{"prompt": "a", "target_new": \n', 2, None, "invalid JSON"),
    (jsonl(OK) + '"just a string"\n', 2, None, "expected a JSON object, got string"),
    (jsonl(OK, {"prompt": "only a prompt"}), 2, "target_new", "missing required field"),
    (jsonl({"target_new": "t"}), 1, "prompt", "missing required field"),
    (jsonl({"prompt": "   ", "target_new": "t"}), 1, "prompt", "must not be empty"),
    (jsonl(OK, OK | {"id": "x"}, {"prompt": "p", "target_new": 5}), 3, "target_new", "expected a string, got number"),
    (jsonl({"prompt": ["a"], "target_new": "t"}), 1, "prompt", "expected a string, got array"),
    (jsonl(OK | {"id": 7}), 1, "id", "expected a string, got number"),
    (jsonl(OK | {"rephrase": {"a": 1}}), 1, "rephrase", "expected a string or a list of strings, got object"),
    (jsonl(OK | {"rephrase": ["fine", 3]}), 1, "rephrase", "entry 2: expected a string, got number"),
    (jsonl(OK | {"rephrase": ["fine", ""]}), 1, "rephrase", "entry 2: must not be empty"),
    (jsonl(OK | {"subject": True}), 1, "subject", "expected a string, got boolean"),
    (jsonl(OK | {"locality_ground_truth": "Paris"}), 1, "locality_ground_truth", "without 'locality_prompt'"),
    (jsonl(OK | {"portability": "q"}), 1, "portability", "expected a list, got string"),
    (jsonl(OK | {"portability": [["q", "a"], {"prompt": "q"}]}), 1, "portability", "entry 2"),
    (jsonl(OK | {"id": "a"}, OK | {"id": "b"}, {"id": "a", "prompt": "q", "target_new": "r"}), 3, "id",
     "duplicate id 'a' (first used on line 1)"),
    (jsonl(OK) + "\n" + jsonl(OK), 3, "id", "(first used on line 1)"),  # same content -> same default id
])
def test_bad_jsonl(tmp_path: Path, text: str, line: int, field: str | None, fragment: str) -> None:
    expect_error(write(tmp_path, text), line, field, fragment)


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    expect_error(write(tmp_path, text), None, None, "no edit records found")


def test_missing_file_directory_and_encoding(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope.jsonl", None, None, "file not found")
    expect_error(tmp_path, None, None, "is a directory")
    bad = write(tmp_path, jsonl(OK).encode() + b'{"prompt": "caf\xe9", "target_new": "t"}\n')
    expect_error(bad, 2, None, "not valid UTF-8")


def test_json_list_errors(tmp_path: Path) -> None:
    expect_error(write(tmp_path, json.dumps(OK), "one.json"), None, None, "expected a JSON list of records, got object")
    expect_error(write(tmp_path, "[]", "empty.json"), None, None, "no edit records found")
    expect_error(write(tmp_path, '[{"src": "q",\n "alt": }]', "syntax.json"), 2, None, "invalid JSON")
    expect_error(write(tmp_path, '[{"question": "q"}]', "odd.json"), 1, None, "unrecognised edit format")
    mend = [{"src": "q1", "alt": "a1"}, {"src": "q2", "alt": ""}, {"src": "q3", "alt": ["a3"]}]
    path = write(tmp_path, json.dumps(mend), "mend.json")
    err = expect_error(path, 2, "alt", "record #2")
    assert err.line == 2 and err.field == "alt"
    # a target given as a list of aliases takes the first; the slice skips the bad record
    assert [(r.prompt, r.target_new, r.source) for r in load_edits(path, offset=2)] == [("q3", "a3", f"{path}:#3")]
    expect_error(write(tmp_path, json.dumps([OK, 3]), "mixed.json"), 2, None, "record #2: expected a JSON object")


def test_offset_and_limit(tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}", "target_new": f"t{i}"} for i in range(5)]
    path = write(tmp_path, jsonl(*rows[:3]) + '{"prompt": 1}\n' + jsonl(rows[4]))
    assert [r.prompt for r in load_edits(path, limit=2)] == ["p0", "p1"]
    assert [r.prompt for r in load_edits(path, offset=1, limit=2)] == ["p1", "p2"]
    assert [r.source for r in load_edits(path, offset=4)] == [f"{path}:5"]
    expect_error(path, 4, "prompt", "expected a string", offset=2)  # only the slice is validated
    expect_error(path, None, None, "no edit records in the selected range", offset=5)
    expect_error(path, None, "offset", "must be >= 0", offset=-1)
    broken = write(tmp_path, jsonl(*rows) + "{oops\n", "broken.jsonl")
    expect_error(broken, 6, None, "invalid JSON", limit=1)  # JSON syntax is checked everywhere


# --- the real benchmark files in shared/data -----------------------------------------------

# file -> (format, records, first record's fields)
REAL = {
    "zsre/zsre_mend_eval.json": ("mend-zsre", 1037, dict(
        prompt="When was the inception of IAAF Combined Events Challenge?", target_new="2006",
        rephrase=("When was the IAAF Combined Events Challenge launched?",),
        locality_prompt="nq question: what is the name of the last episode of spongebob",
        locality_ground_truth="The String", subject="IAAF Combined Events Challenge", ground_truth="1998",
        portability=(("What type of sports event is the IAAF Combined Events Challenge, which was established "
                      "in 2006?", "Athletics"),))),
    "zsre/zsre_mend_train_1k.json": ("mend-zsre", None, dict(
        prompt="What is the product made by UniFirst?", target_new="unmanned aircraft",
        rephrase=("What will be the product of UniFirst?",), ground_truth="uniform", subject="UniFirst",
        locality_prompt="nq question: john goodman's character in the big lebowski",
        locality_ground_truth="Walter Sobchak", portability=())),
    "counterfact/counterfact-edit.json": ("easyedit", 10000, dict(
        id="case-0", prompt="The mother tongue of Danielle Darrieux is", target_new="English",
        ground_truth="French", subject="Danielle Darrieux",
        rephrase=("Where Danielle Darrieux is from, people speak the language of",),
        locality_prompt="Michel Rocard is a native speaker of", locality_ground_truth="French")),
    "counterfact/counterfact-train.json": ("easyedit", 10000, dict(
        id="case-2", prompt="Toko Yasuda, the", target_new="piano", ground_truth="guitar",
        rephrase=("Toko Yasuda is incredible at",), locality_prompt="John Lennon performs on the")),
    "hallucination/hallucination-edit.json": ("easyedit", 600, dict(
        subject="carole gist", ground_truth=None, rephrase=(),
        target_new="She was also the first contestant from Michigan to win Miss USA, and broke the "
                   "five-year streak of winners from Texas.")),
    "hallucination/hallucination-train.json": ("easyedit", 306, dict(subject="frank a. mclain", rephrase=())),
    "temporal/temporal-edit.json": ("easyedit", 75, dict(prompt="Tesla, Inc.,", subject="Tesla, Inc.,")),
    "temporal/temporal-train.json": ("easyedit", 75, dict(prompt="Climate change", ground_truth=None)),
    "knowedit/benchmark_ZsRE_ZsRE-test-all.json": ("knowedit", 1304, dict(
        prompt="Which family does Epaspidoceras belong to?", target_new="Noctuidae", ground_truth="Aspidoceratidae",
        rephrase=("What family are Epaspidoceras?",), subject="Epaspidoceras",
        locality_prompt="The taxon rank of Epaspidoceras is", locality_ground_truth="genus",
        portability=(("What is the common name for the family Epaspidoceras belongs to?", "Owlet moths"),))),
    "knowedit/benchmark_wiki_counterfact_train_cf.json": ("knowedit", 1428, dict(
        prompt="The name of the country which Goursez Vreizh is associated with is", target_new="Franche-Comté",
        ground_truth="France", rephrase=(), locality_prompt="The name of the founder of Goursez Vreizh is",
        locality_ground_truth="Jean Le Fustec",
        portability=(("The name of the capital city of the country Goursez Vreizh is associated with is", "Besançon"),
                     ("The name of the country which Gorsedd of Brittany is associated with is", "Franche-Comté")))),
    "knowedit/benchmark_wiki_recent_recent_train.json": ("knowedit", 570, dict(
        prompt="The gender of Ingrīda Amantova is", target_new="female", ground_truth=None, portability=(),
        locality_prompt="The place of birth of Ingrīda Amantova is", locality_ground_truth="Cēsis")),
    "knowedit/benchmark_WikiBio_wikibio-test-all.json": ("wikibio", 306, dict(
        subject="john russell reynolds", locality_prompt="The field of work of john russell reynolds is",
        locality_ground_truth="medicine", ground_truth=None)),
}


def real(name: str) -> Path:
    path = DATA / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_file_first_records(name: str) -> None:
    path = real(name)
    fmt, _, fields = REAL[name]
    assert detect_format(path) == fmt
    records = load_edits(path, limit=3)
    assert len(records) == 3
    assert records[0].source == f"{path}:#1" and records[2].source == f"{path}:#3"
    for key, value in fields.items():
        assert getattr(records[0], key) == value, key


@pytest.mark.parametrize("name", sorted(n for n, (_, count, _) in REAL.items() if count))
def test_real_file_loads_whole(name: str) -> None:
    path = real(name)
    start = time.perf_counter()
    records = load_edits(path)
    assert time.perf_counter() - start < 1.0
    assert len(records) == REAL[name][1]
    assert len({r.id for r in records}) == len(records)  # benchmarks repeat some edits; ids stay unique
    assert all(r.prompt.strip() and r.target_new.strip() for r in records)


def test_real_file_specifics() -> None:
    wikibio = load_edits(real("knowedit/benchmark_WikiBio_wikibio-test-all.json"), limit=1)[0]
    assert wikibio.prompt.startswith("This is a Wikipedia passage about john russell reynolds. Sir John")
    assert wikibio.target_new.startswith("He received general education from his father")
    temporal = load_edits(real("temporal/temporal-edit.json"), limit=1)[0]
    assert len(temporal.rephrase) == 1 and temporal.rephrase[0].startswith("Tesla, Inc., an American multinational")
    assert temporal.target_new.startswith("originally known as Tesla Motors")
    # ZsRE train has records with an empty `alt`: as edits they are named; offset/limit can avoid them
    train = real("zsre/zsre_mend_train_1k.json")
    with pytest.raises(InputError, match=r":535: field 'alt': record #535"):
        load_edits(train)
    assert len(load_edits(train, limit=534)) == 534
    sliced = load_edits(real("zsre/zsre_mend_eval.json"), offset=500, limit=10)
    assert len(sliced) == 10 and sliced[0].source.endswith(":#501")


# --- load_prompts ------------------------------------------------------------------------------


def test_load_prompts_txt_and_lists(tmp_path: Path) -> None:
    assert load_prompts(write(tmp_path, "first prompt\n\n  second prompt  \n", "neg.txt")) == [
        "first prompt", "second prompt"]
    strings = write(tmp_path, jsonl("alpha", {"prompt": "beta"}, {"text": "gamma"}), "neg.jsonl")
    assert load_prompts(strings) == ["alpha", "beta", "gamma"]
    assert load_prompts(write(tmp_path, json.dumps(["a", {"text": "b"}]), "neg.json")) == ["a", "b"]
    with pytest.raises(InputError, match=r"neg2\.jsonl:2: field 'prompt': expected a string, got number"):
        load_prompts(write(tmp_path, jsonl("ok", 5), "neg2.jsonl"))
    with pytest.raises(InputError, match=r"neither 'prompt' nor 'text'"):
        load_prompts(write(tmp_path, jsonl({"q": "x"}), "neg3.jsonl"))
    with pytest.raises(InputError, match="no prompts found"):
        load_prompts(write(tmp_path, "\n\n", "empty.txt"))
    with pytest.raises(InputError, match="file not found"):
        load_prompts(tmp_path / "missing.txt")


def test_load_prompts_from_edit_files(tmp_path: Path) -> None:
    with_loc = write(tmp_path, jsonl(OK | {"locality_prompt": "L1"}, {"prompt": "p2", "target_new": "t2"}))
    assert load_prompts(with_loc) == ["L1"]
    without_loc = write(tmp_path, jsonl(OK, {"prompt": "p2", "target_new": "t2"}), "plain.jsonl")
    assert load_prompts(without_loc) == ["p", "p2"]
    prompts = load_prompts(real("zsre/zsre_mend_train_1k.json"))  # includes the records without a target
    assert len(prompts) == 1000 and all(p.startswith("nq question: ") for p in prompts)
    assert prompts[0] == "nq question: john goodman's character in the big lebowski"


# --- record_to_json ------------------------------------------------------------------------------


def test_record_to_json_round_trip(tmp_path: Path) -> None:
    records = load_edits(real("zsre/zsre_mend_eval.json"), limit=20)
    records += load_edits(real("knowedit/benchmark_wiki_counterfact_train_cf.json"), limit=5)
    records.append(EditRecord(id="bare", prompt="p", target_new="t"))
    assert record_to_json(records[-1]) == {"id": "bare", "prompt": "p", "target_new": "t"}
    path = write(tmp_path, jsonl(*map(record_to_json, records)), "round.jsonl")
    again = load_edits(path)
    assert [dataclasses.replace(r, source=None) for r in again] == [
        dataclasses.replace(r, source=None) for r in records]
