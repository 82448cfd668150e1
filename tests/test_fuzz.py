"""Fuzzing the readers a user or an attacker can feed: edit files, configs, patched checkpoints.

Two kinds, both seeded and bounded so CI stays fast:
* property-based (hypothesis): any JSON value as an edit line, any bytes as an edit file or a
  config -- the reader accepts sound records or refuses with one line, nothing else;
* the generators of ``benchmarks/fuzz_inputs.py`` (which runs 10,000+ of them outside CI).
"""
from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, seed, settings, strategies as st

from wisecli.methods.wise.config import load_config
from wisecli.app.edits import load_edits

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz_inputs.py"
spec = importlib.util.spec_from_file_location("fuzz_inputs", SCRIPT)
fuzz = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fuzz)

BUDGET = settings(max_examples=150, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20)
records = st.fixed_dictionaries({}, optional={k: json_values | st.text() for k in
                                             ("id", "prompt", "target_new", "rephrase", "subject", "locality_prompt",
                                              "locality_ground_truth", "portability")})


def _handled(call, sound) -> str:
    outcome, detail = fuzz.verdict(call, sound)
    assert outcome != "mishandled", detail
    return outcome


@seed(0)
@BUDGET
@given(record=records)
def test_any_record_is_read_soundly_or_refused_in_one_line(record, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "e.jsonl"
    path.write_bytes((json.dumps(record) + "\n").encode("utf-8", "surrogatepass"))
    _handled(lambda: load_edits(path), fuzz.sound_records)


@seed(1)
@BUDGET
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".json", ".txt"]))
def test_any_bytes_as_an_edit_file(data, suffix, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / f"e{suffix}"
    path.write_bytes(data)
    _handled(lambda: load_edits(path), fuzz.sound_records)


@seed(2)
@BUDGET
@given(text=st.text(max_size=200))
def test_any_text_as_a_config(text, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    _handled(lambda: load_config(path, "llama"), fuzz.sound_config)


@pytest.mark.parametrize("kind,n", [("edits", 400), ("configs", 300)])
def test_the_benchmark_generators_on_a_small_budget(kind, n, tmp_path):
    gen = fuzz.edit_files(random.Random(7)) if kind == "edits" else fuzz.config_files(random.Random(7))
    read = load_edits if kind == "edits" else (lambda p: load_config(p, "llama"))
    sound = fuzz.sound_records if kind == "edits" else fuzz.sound_config
    report = fuzz._run_files(gen, n, read, sound, tmp_path)
    mishandled = sum(c["mishandled"] for c in report["counts"].values())
    refused = sum(c["refused"] for c in report["counts"].values())
    assert mishandled == 0, report["examples"]
    assert refused > n // 4  # the generators do produce bad input


def test_damaged_checkpoints_are_refused_or_sound(tmp_path, wise_cache):
    report = fuzz._run_checkpoints(random.Random(3), 40, tmp_path)
    assert sum(c["mishandled"] for c in report["counts"].values()) == 0, report["examples"]
    assert sum(c["refused"] for c in report["counts"].values()) >= 20
