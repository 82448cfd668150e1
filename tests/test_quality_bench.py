"""benchmarks/quality.py, the lifelong protocol, on a tiny model: it applies the edits in
arrivals, evaluates every one on the final model, and writes the table's JSON and plot."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from wisecli.app.edits import load_edits
from wisecli.app.metrics import evaluate
from wisecli.app.session import open_model

from conftest import EDITS, MORE_EDITS, write_jsonl

pytestmark = pytest.mark.usefixtures("single_thread", "wise_cache")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"
CONFIG = """\
learning_rate: 0.5
replay_weight: 0.15
max_steps: 120
mask_ratio: 0.5
n_prefixes: 2
n_negatives: 4
negative_lengths: [4]
negatives_per_step: 4
"""


def _quality():
    spec = importlib.util.spec_from_file_location("quality_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quality_benchmark_writes_the_table(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    data = write_jsonl(tmp_path / "edits.jsonl", EDITS + MORE_EDITS)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(CONFIG)
    out = tmp_path / "results"
    monkeypatch.setattr(sys, "argv", [
        "quality.py", "--dataset", str(data), "--T", "1", str(len(EDITS) + len(MORE_EDITS)),
        "--model", str(tiny_llama_dir), "--device", "cpu", "--config", str(cfg),
        "--arrival", "5", "--out", str(out), "--save", str(tmp_path / "saved")])
    _quality().main()
    printed = capsys.readouterr().out
    result = json.loads((out / f"quality-edits-{tiny_llama_dir.name}-merge.json").read_text())
    assert (out / f"quality-edits-{tiny_llama_dir.name}-merge.png").stat().st_size > 1000
    rows = result["rows"]
    assert [r["T"] for r in rows] == [1, len(EDITS) + len(MORE_EDITS)]
    for r in rows:
        parts = [r[k] for k in ("reliability", "generalization", "locality") if r[k] is not None]
        assert r["avg"] == pytest.approx(sum(parts) / len(parts))
        assert 0.0 <= r["reliability"] <= 1.0 and r["seconds_per_edit"] > 0
        assert r["memories"] == 1               # merge mode: one side memory, whatever T
        assert f"{r['reliability']:.3f}" in printed
    # the edits are learned, not just counted: a tiny model still takes them in
    assert rows[0]["reliability"] == 1.0
    assert rows[1]["reliability"] >= 0.5
    # --save wrote the trained state as a checkpoint that evaluates to the same figures
    saved = open_model(str(tmp_path / "saved" / f"T{rows[1]['T']}"), device="cpu")
    assert saved.mem.n_memories == rows[1]["memories"]
    again = evaluate(saved.model, saved.tokenizer, saved.mem, load_edits(data), generate=False)
    assert again.reliability == pytest.approx(rows[1]["reliability"])
    assert again.locality == pytest.approx(rows[1]["locality"])
    with pytest.raises(SystemExit, match="already exists"):  # never overwritten
        _quality().main()


def test_many_memories_benchmark_routes_and_matches(tiny_llama_dir, monkeypatch, capsys):
    """benchmarks/many_memories.py: the routable-only path generates exactly what computing
    every memory does, with the keyed prompts routed and the others not."""
    spec = importlib.util.spec_from_file_location("many_memories", SCRIPT.parent / "many_memories.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(sys, "argv", ["many_memories.py", "--model", str(tiny_llama_dir), "--device", "cpu",
                                      "--memories", "12", "--edits-per-memory", "100", "--new-tokens", "3",
                                      "--reps", "1", "--json"])
    mod.main()
    printed = capsys.readouterr().out
    res = json.loads(printed[printed.index("{"):])
    assert res["memories"] == 12 and res["edits"] == 1200 and res["prompts"] == 8 + len(mod.OTHER)
    assert res["same_tokens"] is True
    assert res["prompts_routed"] == 8 and res["other_prompts_routed"] == 0
    assert res["seconds_routable_only"] > 0 and res["seconds_every_memory"] > 0
