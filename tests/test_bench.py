"""wise bench on a tiny model: every figure is there, measured, and consistent."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from wisecli.app.bench.synthetic import SHAPES, synthetic_edits
from wisecli.app.cli.main import app

pytestmark = pytest.mark.usefixtures("single_thread", "wise_cache")


def test_bench_json_has_every_figure(tiny_llama_dir):
    res = CliRunner().invoke(app, ["bench", str(tiny_llama_dir), "--edits", "4", "--batch", "2",
                                   "--compare-reference", "--reps", "2", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    for key in ("seconds_per_edit", "forward_seconds", "edit_cost_forward_equivalents",
                "inference_overhead", "peak_memory_bytes", "device", "model",
                "reference_seconds_per_edit", "speedup_vs_reference"):
        assert key in out, key
    assert out["seconds_per_edit"] > 0 and out["forward_seconds"] > 0
    assert out["peak_memory_bytes"] > 10 * 2**20
    assert out["edit_cost_forward_equivalents"] == pytest.approx(
        out["seconds_per_edit"] / out["forward_seconds"], rel=0.05)
    # the overheads are the patched/base ratios of the medians it reports beside them
    for what, key in (("forward", "inference_overhead"), ("generate", "generation_overhead")):
        base, patched = out[f"{what}_base_seconds"], out[f"{what}_patched_seconds"]
        assert base > 0 and patched > 0
        # (the seconds are printed rounded: 4-5 digits of a few milliseconds)
        assert 1 + out[key] == pytest.approx(patched / base, rel=0.05)
    assert out["speedup_vs_reference"] == pytest.approx(
        out["reference_seconds_per_edit"] / out["fast_seconds_per_edit_same_edits"], rel=0.05)
    assert out["device"] == "cpu" and out["synthetic"] is False


def test_unknown_synthetic_shape_is_an_error(monkeypatch, capsys):
    """A user error: exit 1, one line naming the shape and the ones there are, no traceback."""
    from cli_support import error_line, run_main
    code, _, err = run_main(monkeypatch, capsys, "bench", "--synthetic", "llama-9b", "--device", "cpu")
    assert code == 1, err
    line = error_line(err)
    assert "llama-9b" in line and "llama-2-7b" in err


def test_synthetic_edits_are_deterministic_and_distinct():
    a, b = synthetic_edits(12, seed=1), synthetic_edits(12, seed=1)
    assert [e.prompt for e in a] == [e.prompt for e in b]
    assert len({e.id for e in a}) == 12
    assert all(e.subject in e.prompt and e.target_new for e in a)
    assert {"llama-2-7b", "llama-3-8b", "mistral-7b", "qwen2.5-7b"} <= set(SHAPES)
