"""Checkpoints written by an earlier release load and give the same logits, routes and
generations (tests/data/compat-v1/README.md says how they were made)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from wisecli.batching import encode_pairs
from wisecli.errors import ConfigError
from wisecli.app.manifest import FORMAT_VERSION
from wisecli.app.session import open_model
from wisecli.runtime.router import NO_MEMORY, RouterConfig

pytestmark = pytest.mark.usefixtures("single_thread", "wise_cache")

DATA = Path(__file__).parent / "data" / "compat-v1"


@pytest.mark.parametrize("name", ["merge", "retrieve"])
def test_a_format_1_checkpoint_gives_what_it_gave(name):
    expected = json.loads((DATA / f"expected-{name}.json").read_text())
    want = safetensors.torch.load_file(str(DATA / f"expected-{name}.safetensors"))["logits"]
    sess = open_model(str(DATA / name), device="cpu")
    assert sess.manifest["format_version"] == FORMAT_VERSION  # upgraded on read
    assert sess.mem.n_memories == expected["n_memories"]
    assert sess.mem.router.cfg == RouterConfig(pooling="max", hold=True, key_gate=0.85, coverage_gate=0.6,
                                               subject_gate=True)
    prompts = expected["prompts"]
    batch = encode_pairs(sess.tokenizer, prompts, [None] * len(prompts))
    with torch.no_grad():
        got = sess.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         position_ids=batch.position_ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert sess.mem.last_route.tolist() == expected["routes"]
    assert NO_MEMORY in expected["routes"] and any(r >= 0 for r in expected["routes"])
    tok = sess.tokenizer
    enc = tok(prompts, return_tensors="pt", padding=True, return_token_type_ids=False)
    with torch.no_grad():
        seqs = sess.model.generate(**enc, do_sample=False, max_new_tokens=4, min_new_tokens=4,
                                   pad_token_id=tok.pad_token_id)
    assert tok.batch_decode(seqs[:, enc["input_ids"].shape[1]:], skip_special_tokens=True) == expected["generations"]


def _copy_with_config(tmp_path: Path, **changes) -> Path:
    out = tmp_path / "ckpt"
    shutil.copytree(DATA / "merge", out)
    manifest = json.loads((out / "wise.json").read_text())
    manifest["config"].update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del manifest["config"][key]
    (out / "wise.json").write_text(json.dumps(manifest))
    return out


def test_a_removed_knob_away_from_its_no_op_value_is_named(tmp_path):
    with pytest.raises(ConfigError, match="'old_memory_weight' was removed") as exc:
        open_model(str(_copy_with_config(tmp_path, old_memory_weight=0.5)), device="cpu")
    assert "wise.json" in str(exc.value)


def test_format_1_settings_it_lacks_read_as_they_were_routed(tmp_path):
    """A format-1 manifest written before the gates has none of their keys: it routes with
    them off and the paper's mean pooling, as it did."""
    old = _copy_with_config(tmp_path, key_gate=None, coverage_gate=None, subject_gate=None,
                            score_pooling=None, route_by="closest")
    sess = open_model(str(old), device="cpu")
    assert sess.mem.router.cfg == RouterConfig.plain()


def test_closest_key_routing_over_several_memories_is_refused(tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(DATA / "retrieve", out)
    manifest = json.loads((out / "wise.json").read_text())
    manifest["config"]["route_by"] = "closest"
    (out / "wise.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="'route_by' was removed"):
        open_model(str(out), device="cpu")


def test_the_manifest_schema_is_a_valid_json_schema_that_format_1_upgrades_meet():
    from jsonschema import Draft202012Validator, ValidationError

    from wisecli.app.manifest import schema, upgrade
    Draft202012Validator.check_schema(schema())
    for name in ("merge", "retrieve"):
        raw = json.loads((DATA / name / "wise.json").read_text())
        with pytest.raises(ValidationError):  # format 1 as written is not format 2 ...
            Draft202012Validator(schema()).validate(raw)
        tensors = safetensors.torch.load_file(str(DATA / name / "wise.safetensors"))
        upgraded, _ = upgrade(raw, tensors, "wise.json")  # ... its upgrade is (validated inside)
        assert upgraded["format_version"] == FORMAT_VERSION


DATA_V2 = Path(__file__).parent / "data" / "compat-v2"


@pytest.mark.parametrize("name", ["merge", "retrieve"])
def test_a_format_2_checkpoint_gives_what_it_gave(name):
    """0.4.1's checkpoints (generation routed token by token, targets followed, the cache
    refreshed after an answer): the same logits, routes, answering memories and generations,
    in a left-padded batch and one prompt at a time."""
    expected = json.loads((DATA_V2 / f"expected-{name}.json").read_text())
    want = safetensors.torch.load_file(str(DATA_V2 / f"expected-{name}.safetensors"))["logits"]
    sess = open_model(str(DATA_V2 / name), device="cpu")
    assert sess.manifest["format_version"] == FORMAT_VERSION  # upgraded on read
    assert sess.mem.n_memories == expected["n_memories"]
    assert not sess.mem.router.cfg.hold and sess.mem.edit_targets
    prompts, tok = expected["prompts"], sess.tokenizer
    batch = encode_pairs(tok, prompts, [None] * len(prompts))
    with torch.no_grad():
        got = sess.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         position_ids=batch.position_ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert sess.mem.last_route.tolist() == expected["routes"]
    enc = tok(prompts, return_tensors="pt", padding=True, return_token_type_ids=False)
    with torch.no_grad():
        seqs = sess.model.generate(**enc, do_sample=False, max_new_tokens=10, min_new_tokens=10,
                                   pad_token_id=tok.pad_token_id)
    assert tok.batch_decode(seqs[:, enc["input_ids"].shape[1]:], skip_special_tokens=True) == expected["generations"]
    assert sess.mem.answered_route.tolist() == expected["answered"]
    alone = []
    for p in prompts:
        one = tok([p], return_tensors="pt", return_token_type_ids=False)
        with torch.no_grad():
            s = sess.model.generate(**one, do_sample=False, max_new_tokens=10, min_new_tokens=10,
                                    pad_token_id=tok.pad_token_id)
        alone.append(tok.decode(s[0, one["input_ids"].shape[1]:], skip_special_tokens=True))
    assert alone == expected["generations_alone"]
