"""UltraEdit's algebra and editor on a tiny model: the statistics merge exactly across turns,
the shift solves its least-squares problem, a turn raises the edits' answers, and the
unedited model stays recoverable exactly."""
from __future__ import annotations

import pytest
import torch

from wisecli.batching import encode_pairs
from wisecli.errors import ConfigError
from wisecli.methods.ultraedit.config import UltraEditConfig, edited_modules, from_dict
from wisecli.methods.ultraedit.editor import UltraEditor
from wisecli.methods.ultraedit.maths import merge_moments, normalise, weight_shift
from wisecli.methods.ultraedit.weights import EditedWeights
from wisecli.records import EditRecord

from conftest import EDITS

pytestmark = pytest.mark.usefixtures("single_thread")


def test_moments_merged_turn_by_turn_equal_those_of_all_rows_at_once():
    torch.manual_seed(0)
    rows = torch.randn(50, 6) * 3 + 1
    mean, var, count = torch.zeros(6), torch.ones(6), 0.0
    for part in (rows[:7], rows[7:30], rows[30:]):
        mean, var, count = merge_moments(mean, var, count, part)
    assert count == 50
    torch.testing.assert_close(mean, rows.mean(0))
    torch.testing.assert_close(var, rows.var(0, unbiased=False))


def test_the_shift_solves_the_ridge_problem_on_the_raw_keys():
    torch.manual_seed(1)
    keys, grads = torch.randn(20, 8), torch.randn(20, 5)
    mean, var, _ = merge_moments(torch.zeros(13), torch.ones(13), 0.0, torch.cat([keys, grads], -1))
    delta = weight_shift(keys, grads, mean, var, learning_rate=0.1, ridge=2.0)
    assert delta.shape == (5, 8)
    k_hat, g_hat = normalise(torch.cat([keys, grads], -1), mean, var).split([8, 5], -1)
    values = -0.1 * k_hat.square().sum(-1, keepdim=True) * g_hat
    torch.testing.assert_close((keys.T @ keys + 2.0 * torch.eye(8)) @ delta.T, keys.T @ values, atol=1e-4, rtol=1e-4)


def _answer_loss(model, tok, records) -> float:
    batch = encode_pairs(tok, [r.prompt for r in records], [r.target_new for r in records])
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids).logits
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(),
                                                   ignore_index=-100))


def test_a_turn_raises_the_answers_and_the_unedited_model_stays_exact(tiny_llama_dir):
    from wisecli.app.models import load_model
    model, tok = load_model(tiny_llama_dir, torch.device("cpu"), torch.float32)
    records = [EditRecord(id=e["id"], prompt=e["prompt"], target_new=e["target_new"]) for e in EDITS]
    cfg = UltraEditConfig(learning_rate=1e-2, passes=3)
    paths = edited_modules(model, cfg)
    assert paths == ["model.layers.1.mlp.gate_proj", "model.layers.2.mlp.gate_proj",
                     "model.layers.2.mlp.up_proj", "model.layers.3.mlp.up_proj"]
    weights = EditedWeights(model, paths)
    batch = tok(["the king plays music"], return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        before = model(**batch).logits
    loss_before = _answer_loss(model, tok, records)
    editor = UltraEditor(model, tok, weights, cfg, None)
    out = editor.apply(records)
    assert [o["id"] for o in out] == ["e1", "e2", "e3"] and weights.n_memories == 1
    assert _answer_loss(model, tok, records) < 0.9 * loss_before
    with torch.no_grad(), weights.main_only():
        assert torch.equal(model(**batch).logits, before)
    assert not torch.equal(model(**batch).logits, before)
    tensors, state = editor.saved()
    assert state == {"n_edits": 3} and set(f"shift.{p}" for p in paths) <= set(tensors)
    counted = float(tensors["count_0_64x128"])
    editor.apply(records[:1])
    assert float(weights.moments("0_64x128", 192, torch.device("cpu"))[2]) > counted and editor.saved()[1] == {"n_edits": 4}


@pytest.mark.parametrize("data,message", [
    ({"lr": 1}, "unknown key 'lr'"),
    ({"learning_rate": 0}, "field 'learning_rate': must be a number > 0"),
    ({"passes": 1.5}, "field 'passes': must be an integer >= 1"),
    ({"modules": "model.layers.1.mlp.up_proj"}, "field 'modules': must be a list"),
])
def test_a_bad_config_names_its_field(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(data, "ue.yaml")


def test_a_module_that_is_not_a_linear_layer_is_refused(tiny_llama_dir):
    from wisecli.app.models import load_model
    model, _ = load_model(tiny_llama_dir, torch.device("cpu"), torch.float32)
    with pytest.raises(ConfigError, match="not a linear layer"):
        edited_modules(model, UltraEditConfig(modules=("model.layers.1.mlp",)))
    with pytest.raises(ConfigError, match="not found"):
        edited_modules(model, UltraEditConfig(modules=("model.layers.9.mlp.up_proj",)))


def _second_turn_moves_first_keys(tiny_llama_dir, keep_edits: float) -> float:
    """How far a second turn moves the edited layers' outputs at the first turn's keys."""
    from wisecli.app.models import load_model
    model, tok = load_model(tiny_llama_dir, torch.device("cpu"), torch.float32)
    records = [EditRecord(id=e["id"], prompt=e["prompt"], target_new=e["target_new"]) for e in EDITS]
    cfg = UltraEditConfig(learning_rate=1e-2, passes=1, preserve=0.0, keep_edits=keep_edits)
    weights = EditedWeights(model, edited_modules(model, cfg))
    editor = UltraEditor(model, tok, weights, cfg, None)
    editor.apply(records[:2])
    first = {p: weights.edited_moment(p).clone() for p in weights.paths}
    shifts = {p: weights.shift(p).clone() for p in weights.paths}
    editor.apply(records[2:])
    # Σ over the first turn's keys k of ‖ΔW k‖², from their second moment: trace(ΔW M ΔWᵀ)
    return sum(float(torch.trace((weights.shift(p) - shifts[p]) @ first[p] @ (weights.shift(p) - shifts[p]).T))
               for p in weights.paths)


def test_earlier_edits_keys_are_kept_by_later_turns(tiny_llama_dir):
    assert _second_turn_moves_first_keys(tiny_llama_dir, 1.0) < 0.5 * _second_turn_moves_first_keys(tiny_llama_dir, 0.0)
