"""WISE end to end on tiny random checkpoints: the side-memory layer, the fast training path,
lifelong edits, the checkpoint round trip, retrieve mode, thresholds and replay (per-example
routing is in test_routing.py).

Every test runs on a LLaMA (``nn.Linear`` down_proj) and a GPT-2 (transposed ``Conv1D``
c_proj), each saved to disk by ``conftest`` and opened the way the CLI opens it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from wisecli.app.checkpoint import write_checkpoint
from wisecli.methods.wise.config import WiseConfig
from wisecli.app.edits import EditRecord
from wisecli.app.metrics import evaluate
from wisecli.app.manifest import FORMAT_VERSION, upgrade
from wisecli.app.pipeline import after_run
from wisecli.app.models import load_model
from wisecli.app.session import open_model
from wisecli.methods.wise.editor import EditorState, WiseEditor
from wisecli.runtime.maths import fp8_keys, from_fp8_keys, shard_mask
from wisecli.runtime.memory import SideMemoryLayer
from wisecli.runtime.router import NO_MEMORY, RouterConfig
from wisecli.app.bench.reference import reference_forward
from wisecli.methods.wise.recorded import record_inputs
from wisecli.methods.wise.train import fast_forward, train_shard, variants_per_step

from conftest import EDITS
from wise_support import ARCHS, arch, arch_dir, logits as _logits, model_dir, route as _route  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")

RECORDS = [EditRecord(id=e["id"], prompt=e["prompt"], target_new=e["target_new"],
                      rephrase=tuple(e.get("rephrase", ())),
                      locality_prompt=e.get("locality_prompt"),
                      locality_ground_truth=e.get("locality_ground_truth")) for e in EDITS]
PREFIXES = ["the old king .", "a big sea ."]
NEGATIVES = ["the river of germany", "my song is red", "who plays music", "the moon and the sun"]
UNEDITED = "the green lake and the small mountain"
# Enough steps and a dense enough mask that a random 4-layer model learns all three edits.  Its
# activations are large against its random down-projection's output (replay curvature ~20x
# smollm2's per unit of score), so plain SGD needs a small step and a light replay weight.
REPLAY = 0.15
LEARN = dict(learning_rate=0.5, replay_weight=REPLAY, max_steps=60, mask_ratio=0.5, n_prefixes=2, n_negatives=4,
             negative_lengths=(4,), negatives_per_step=4)


# ---- the layer ---------------------------------------------------------------------


def test_zero_memories_is_the_unwrapped_model(model_dir):
    sess = open_model(str(model_dir), device="cpu")
    assert isinstance(sess.mem, SideMemoryLayer) and sess.mem.n_memories == 0
    assert sess.mem.kind == ("conv1d" if "gpt2" in model_dir.name else "linear")
    plain, tok = load_model(model_dir, torch.device("cpu"), torch.float32)
    texts = [RECORDS[0].prompt, UNEDITED, "who"]
    assert torch.equal(_logits(sess.model, sess.tokenizer, texts), _logits(plain, tok, texts))


def test_wise_state_is_exactly_the_buffers(model_dir):
    sess = open_model(str(model_dir), device="cpu")
    state = sess.mem.wise_state()
    assert set(state) == {"memories", "thresholds", "min_edit_scores", "scale", "basis",
                          "edit_keys", "key_edit", "key_memory", "answer_keys", "answer_key_edit",
                          "other_keys", "other_key_edit", "replay_factor", "replay_count", "shard_factors", "shard_memory", "shard_seeds"}
    assert tuple(state["memories"].shape) == (0, sess.mem.out_features, sess.mem.in_features)
    # buffers, so state_dict carries them and nothing needs pickle
    keys = {k.rsplit(".", 1)[-1] for k in sess.model.state_dict() if "base_layer" not in k
            and k.startswith(sess.target.module_path)}
    assert set(state) <= keys


def test_older_checkpoint_replay_moment_loads_as_a_factor(model_dir):
    """Format-1 checkpoints written before the factor hold the full moment ``replay_cov``,
    and those written before keys hold neither keys nor replay: the upgrade fills them in."""
    sess = open_model(str(model_dir), device="cpu")
    tokens = torch.randn(50, sess.mem.in_features, generator=torch.Generator().manual_seed(0))
    cov = tokens.T @ tokens / 50
    old = {k: v for k, v in sess.mem.wise_state().items()
           if k not in ("replay_factor", "edit_keys", "key_edit", "key_memory")}
    v1 = json.loads((Path(__file__).parent / "data" / "compat-v1" / "merge" / "wise.json").read_text())
    v1["config"] = {k: v for k, v in v1["config"].items() if k != "key_gate"}  # written before the gate
    manifest, state = upgrade(v1, {**old, "replay_cov": cov}, "wise.json")
    assert manifest["format_version"] == FORMAT_VERSION and manifest["method"] == "wise" and manifest["config"]["key_gate"] == 0.0
    assert manifest["config"]["answer_gate"] == 0.0  # routed without the answer gate: kept so
    sess.mem.load_wise_state(state)
    assert sess.mem.edit_keys.shape == sess.mem.answer_keys.shape == (0, sess.mem.in_features)
    f = sess.mem.replay_factor
    torch.testing.assert_close(f @ f.T, cov, atol=1e-4, rtol=1e-4)


# ---- the fast path equals the full-forward reference ---------------------------------


def _shard_setup(sess, cfg, seed=3):
    """An editor with fixed prefixes and negatives, a shard batch whose first edit names a
    subject (so near-miss rows, row_edit -2, are in it), a zero start and a shard mask."""
    editor = WiseEditor(sess.model, sess.tokenizer, sess.mem, sess.blocks, sess.target.layer, cfg)
    editor.state.prefixes, editor.state.negatives = list(PREFIXES), list(NEGATIVES)
    sess.mem.calibrate(*editor.measure_scale(NEGATIVES))
    edits = [RECORDS[0].__class__(**{**RECORDS[0].__dict__, "subject": "france"}), *RECORDS[1:]]
    batch, row_edit = editor.shard_batch(edits)
    base = torch.zeros(sess.mem.out_features, sess.mem.in_features)
    return editor, batch, row_edit, base, shard_mask(base.shape, 0.5, seed=seed)


@pytest.mark.parametrize("layer", [2, 3])
def test_fast_path_equals_full_forward_reference(request, arch, layer):
    sess = open_model(str(arch_dir(request, arch)), device="cpu", layer=layer)
    cfg = WiseConfig(max_steps=5, min_steps=5, check_every=5, n_prefixes=2, negatives_per_step=2,
                     variants_per_step=2, learning_rate=0.05)
    editor, batch, row_edit, base, mask = _shard_setup(sess, cfg)
    assert (row_edit == -2).any() and (row_edit == -1).sum() == len(NEGATIVES)

    calls = {"n": 0}
    handle = sess.blocks[0].register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    try:
        fast = train_shard(sess.model, sess.mem, sess.blocks, layer, batch, row_edit, base, mask, cfg)
        fast_calls = calls["n"]
        full = train_shard(sess.model, sess.mem, sess.blocks, layer, batch, row_edit, base, mask, cfg,
                           forward=reference_forward(sess.model, sess.mem, batch))
        full_calls = calls["n"] - fast_calls
    finally:
        handle.remove()
    assert fast_calls == 1                 # the lower blocks ran once, to record their output
    assert full_calls == cfg.max_steps     # the reference runs them every step
    assert fast.steps == full.steps == 5
    assert fast.delta.norm() > 0
    assert not fast.delta[~mask].any()     # the update lives under the shard's mask only
    rel = (fast.delta - full.delta).norm() / fast.delta.norm()
    assert rel.item() <= 1e-4
    assert fast.loss == pytest.approx(full.loss, rel=1e-4)
    # the irrelevant prompts' activations recorded once (as the editor keeps them) give
    # the same memory, and the lower blocks then run on the edit and near-miss rows only
    rows, known = [], editor._negative_acts()
    handle = sess.blocks[0].register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[0]))
    try:
        cached = train_shard(sess.model, sess.mem, sess.blocks, layer, batch, row_edit, base, mask, cfg,
                             known=known)
    finally:
        handle.remove()
    assert rows == [int((row_edit != -1).sum())]
    assert ((cached.delta - full.delta).norm() / full.delta.norm()).item() <= 1e-4
    assert torch.allclose(cached.edit_acts, fast.edit_acts, atol=1e-5)
    # the model is left as it was found
    assert sess.mem._train_delta is None and sess.mem._mask_override is None
    assert all(type(b).__name__ != "_Replay" for b in sess.blocks)


@pytest.mark.parametrize("tokens_per_edit,variants", [(1, 1), (10_000, 3)])
def test_long_prompts_train_on_fewer_variants(model_dir, tokens_per_edit, variants):
    """An edit whose rows are longer than tokens_per_edit trains on its bare prompt alone:
    the blocks above the memory see one row per edit instead of variants_per_step."""
    sess = open_model(model_dir, device="cpu")
    cfg = WiseConfig(max_steps=5, min_steps=5, check_every=5, n_prefixes=2, negatives_per_step=2,
                     variants_per_step=3, tokens_per_edit=tokens_per_edit, learning_rate=0.05)
    _editor, batch, row_edit, base, mask = _shard_setup(sess, cfg)
    rows: list[int] = []
    handle = sess.blocks[-1].register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[0]))
    try:
        res = train_shard(sess.model, sess.mem, sess.blocks, sess.target.layer, batch, row_edit,
                          base, mask, cfg)
    finally:
        handle.remove()
    assert res.delta.norm() > 0
    assert max(rows) == variants * (int(row_edit.max()) + 1)


def test_variants_shrink_with_row_length():
    cfg = WiseConfig()  # 3 variants within 160 tokens per edit
    assert [variants_per_step(cfg, n) for n in (20, 53, 54, 80, 81, 190)] == [3, 3, 2, 2, 1, 1]


def test_learned_edits_rest_only_with_confidence_to_spare(model_dir):
    """An edit stops getting the cross-entropy (and its rows their forward pass above the
    layer) once it is right with answer NLL below learned_nll, not as soon as it is right.
    And a shard stops early once its edits are right: near misses (the key gate's job) do
    not hold it back."""
    sess = open_model(str(model_dir), device="cpu")
    ce_rows = {}
    for learned_nll in (10.0, 1e-3):
        cfg = WiseConfig(**{**LEARN, "max_steps": 40, "min_steps": 40, "learned_nll": learned_nll})
        _, batch, row_edit, base, mask = _shard_setup(sess, cfg)
        run = fast_forward(sess.model, sess.mem, sess.blocks, sess.target.layer, batch,
                           record_inputs(sess.model, sess.blocks, sess.mem, sess.target.layer, batch),
                           cfg.score_pooling)
        seen: list[int] = []

        def counted(ce_idx, *rest, _run=run, _seen=seen):
            _seen.append(ce_idx.numel())
            return _run(ce_idx, *rest)
        res = train_shard(sess.model, sess.mem, sess.blocks, sess.target.layer, batch, row_edit,
                          base, mask, cfg, forward=counted)
        assert learned_nll < 1 or res.learned == res.n_edits
        ce_rows[learned_nll] = seen
    n_rows = max(ce_rows[1e-3])
    # unsure edits train at every step; edits merely right rest between the checks
    assert ce_rows[1e-3] == [n_rows] * 40
    assert sum(ce_rows[10.0]) < 0.9 * sum(ce_rows[1e-3]), str(ce_rows[10.0])
    cfg = WiseConfig(**{**LEARN, "max_steps": 200})
    _, batch, row_edit, base, mask = _shard_setup(sess, cfg)
    assert (row_edit == -2).any()
    res = train_shard(sess.model, sess.mem, sess.blocks, sess.target.layer, batch, row_edit, base, mask, cfg)
    assert res.learned == res.n_edits and res.steps < cfg.max_steps


def test_out_of_steps_keeps_the_last_state_with_every_edit_right(model_dir):
    """A shard that runs out of steps (its router never separated) ends on the last tau that
    had every edit right, not on one where an edit resting from the cross-entropy drifted
    wrong under the margin loss (CounterFact T=100 with the paper's train negatives)."""
    sess = open_model(str(model_dir), device="cpu")
    cfg = WiseConfig(**{**LEARN, "max_steps": 200, "min_steps": 200})
    _, batch, row_edit, base, mask = _shard_setup(sess, cfg)
    run = fast_forward(sess.model, sess.mem, sess.blocks, sess.target.layer, batch,
                       record_inputs(sess.model, sess.blocks, sess.mem, sess.target.layer, batch),
                       cfg.score_pooling)
    deltas: list[torch.Tensor] = []
    all_right: list[int] = []  # check steps where every edit was right

    def drifting(ce_idx, e_idx, i_idx, delta):
        deltas.append(delta.detach().clone())
        ce, *rest = run(ce_idx, e_idx, i_idx, delta)
        step = len(deltas)
        if step == cfg.max_steps:  # the last check: one edit has slipped
            ce = (ce[0], torch.zeros_like(ce[1]))
        elif step % cfg.check_every == 0 and bool(ce[1].all()):
            all_right.append(step)
        return (ce, *rest)
    res = train_shard(sess.model, sess.mem, sess.blocks, sess.target.layer, batch, row_edit,
                      base, mask, cfg, forward=drifting)
    assert all_right, "the tiny model never had every edit right: the test learns nothing"
    last = all_right[-1]
    # tau after step `last` is what the forward of step last + 1 received, less the base
    assert torch.allclose(res.delta, (deltas[last] - base).float())
    assert not torch.allclose(res.delta, (deltas[-1] - base).float())
    assert res.learned == res.n_edits and res.steps == cfg.max_steps


# ---- a lifelong run: learn, save, reload ------------------------------------------------


@pytest.fixture(scope="module", params=ARCHS)
def edited(request, single_thread):
    """A session with the three test edits trained in (merge mode), shared by this module."""
    sess = open_model(str(arch_dir(request, request.param)), device="cpu")
    cfg = WiseConfig(**LEARN)
    editor = WiseEditor(sess.model, sess.tokenizer, sess.mem, sess.blocks, sess.target.layer, cfg)
    editor.prepare()
    placed = editor.apply(RECORDS)
    return sess, cfg, editor, placed


def test_editor_learns_edits(edited):
    sess, cfg, editor, placed = edited
    assert [p["id"] for p in placed] == [r.id for r in RECORDS]
    assert all(p["memory"] == 0 for p in placed)
    assert sess.mem.n_memories == 1 and sess.mem.thresholds.shape == (1,)
    assert float(sess.mem.thresholds[0]) == pytest.approx(cfg.act_ratio * float(sess.mem.min_edit_scores[0]))
    assert len(editor.state.prefixes) == 2 and len(editor.state.negatives) == 4
    report = evaluate(sess.model, sess.tokenizer, sess.mem, RECORDS, generate=False)
    assert report.reliability >= 0.66
    assert all(e.routed for e in report.edits)
    # e1 and e3 have a rephrase, e1 and e2 a locality prompt: both measured, from those edits only
    assert [e.generalization is not None for e in report.edits] == [True, False, True]
    assert [e.locality is not None for e in report.edits] == [True, True, False]
    assert report.generalization == pytest.approx((report.edits[0].generalization + report.edits[2].generalization) / 2)
    assert report.locality == pytest.approx((report.edits[0].locality + report.edits[1].locality) / 2)


def test_checkpoint_round_trip(edited, tmp_path, wise_cache):
    sess, cfg, editor, placed = edited
    out = tmp_path / "patched"
    manifest = after_run(sess, cfg, editor.state.to_dict(), RECORDS, placed, None, "edits.jsonl", 1.0)
    tensors, _ = editor.saved()
    # the memory and replay factor are float16 values held in float32, the keys float8 values
    # held in float16: stored in 16 and 8 bits, exactly (the equality below)
    assert tensors["memories"].dtype == tensors["replay_factor"].dtype == torch.float16
    assert tensors["edit_keys"].dtype == torch.float8_e4m3fn and tensors["key_exponents"].dtype == torch.int16
    # answer keys: the bare prompt (the tiny tokenizer has no chat template for the chat turns')
    assert tensors["answer_keys"].dtype == torch.float8_e4m3fn and tensors["answer_key_exponents"].dtype == torch.int16
    assert tensors["answer_key_edit"].tolist() == [0, 1, 2]
    write_checkpoint(out, base_dir=sess.base_dir, tensors=tensors, manifest=manifest)
    assert {"wise.json", "wise.safetensors", "config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}

    again = open_model(str(out), device="cpu")
    assert again.manifest is not None and again.target == sess.target
    for name, t in sess.mem.wise_state().items():
        assert torch.equal(again.mem.wise_state()[name], t), name
    for text in (RECORDS[0].prompt, RECORDS[2].prompt, UNEDITED):
        want, got = _logits(sess.model, sess.tokenizer, [text]), _logits(again.model, again.tokenizer, [text])
        assert torch.equal(got, want), text
        assert torch.equal(_route(again, text), _route(sess, text)), text
    assert int(_route(again, RECORDS[0].prompt)) == 0
    # the JSON half: a later run continues with the same prefixes, negatives and settings
    st = EditorState.from_dict(again.manifest["editor"])
    assert (st.prefixes, st.negatives, st.shards_trained) == \
        (editor.state.prefixes, editor.state.negatives, editor.state.shards_trained)
    assert again.resolve_config(None, {}) == cfg.replace(layer=sess.target.layer)
    assert [e["id"] for e in again.manifest["edits"]] == [r.id for r in RECORDS]
    # the subject gate's half: each edit's subject and memory, from the manifest
    assert again.mem.router.cfg == RouterConfig.from_config(cfg)
    assert again.mem.edit_subjects == sess.mem.edit_subjects == [(0, None)] * len(RECORDS)


# ---- retrieve mode -------------------------------------------------------------------


def test_retrieve_mode_one_memory_per_merge_group(model_dir):
    sess = open_model(str(model_dir), device="cpu")
    cfg = WiseConfig(**{**LEARN, "mode": "retrieve", "edits_per_shard": 1, "shards_per_merge": 2})
    editor = WiseEditor(sess.model, sess.tokenizer, sess.mem, sess.blocks, sess.target.layer, cfg)
    editor.prepare()
    placed = editor.apply(RECORDS)  # shards [e1] [e2] [e3] -> groups [e1 e2] [e3]
    assert sess.mem.n_memories == 2
    assert sess.mem.thresholds.shape == sess.mem.min_edit_scores.shape == (2,)
    assert [p["memory"] for p in placed] == [0, 0, 1]
    assert [p["shard"] for p in placed] == [0, 1, 2]
    assert editor.state.memory_edit_counts == [2, 1]
    assert editor.state.shards_trained == 3
    for rec in RECORDS:
        assert int(_route(sess, rec.prompt)) != NO_MEMORY, rec.id


def test_merge_mode_opens_a_new_memory_when_one_is_full(model_dir):
    """edits_per_memory caps what one merged memory holds; the next edit starts a fresh
    memory (and a fresh replay factor: the earlier edits are in the full one)."""
    sess = open_model(str(model_dir), device="cpu")
    cfg = WiseConfig(**{**LEARN, "edits_per_shard": 1, "shards_per_merge": 1, "edits_per_memory": 2})
    editor = WiseEditor(sess.model, sess.tokenizer, sess.mem, sess.blocks, sess.target.layer, cfg)
    editor.prepare()
    placed = editor.apply(RECORDS[:2])
    full = sess.mem.memories[0].clone()
    two_edits_tokens = float(sess.mem.replay_count)
    placed += editor.apply(RECORDS[2:3])
    assert [p["memory"] for p in placed] == [0, 0, 1]
    assert editor.state.memory_edit_counts == [2, 1]
    assert sess.mem.n_memories == 2 and sess.mem.thresholds.shape == (2,)
    torch.testing.assert_close(sess.mem.memories[0], full)  # the full memory is left as it was
    assert 0 < float(sess.mem.replay_count) < two_edits_tokens
    assert sess.mem.key_memory.tolist()[-1] == 1
    for rec in RECORDS:
        assert int(_route(sess, rec.prompt)) != NO_MEMORY, rec.id


def _prompt_score(sess, text: str, k: int = 0) -> float:
    """Router score of a bare prompt under side memory k, from a plain forward."""
    _logits(sess.model, sess.tokenizer, [text])
    return float(sess.mem.last_scores[k, 0])


def test_merge_mode_threshold_tracks_the_memory_over_all_edits(model_dir):
    """After every merge the threshold is act_ratio x the lowest score of *all* the
    memory's edits under the memory as it is now, not the first group's frozen value."""
    sess = open_model(str(model_dir), device="cpu")
    cfg = WiseConfig(**{**LEARN, "edits_per_shard": 1, "shards_per_merge": 1, "keys_per_edit": 64})
    editor = WiseEditor(sess.model, sess.tokenizer, sess.mem, sess.blocks, sess.target.layer, cfg)
    editor.prepare()
    for n in range(1, len(RECORDS) + 1):
        editor.apply(RECORDS[n - 1:n])
        scores = [_prompt_score(sess, r.prompt) for r in RECORDS[:n]]
        # keys are float8 values (3-bit mantissa), hence the tolerance: well inside act_ratio's 20 %
        assert float(sess.mem.min_edit_scores[0]) == pytest.approx(min(scores), rel=3e-2)
        assert float(sess.mem.thresholds[0]) == pytest.approx(cfg.act_ratio * min(scores), rel=3e-2)
    assert int(sess.mem.key_edit.max()) == len(RECORDS) - 1
    assert (sess.mem.key_memory == 0).all()
    # float8 values held in float16; a checkpoint stores them in 8 bits (4 keys of a 7B model: 44 KB)
    assert sess.mem.edit_keys.dtype == torch.float16
    values, exponents = fp8_keys(sess.mem.edit_keys)
    assert torch.equal(from_fp8_keys(values, exponents).half(), sess.mem.edit_keys)


def test_replay_keeps_earlier_edits_output_in_merge_mode(model_dir):
    """With replay, training a second shard on top of the first changes the memory's
    output on the first shard's activations less than without, and the running
    second moment counts every token of the first shard's rows."""
    changes = {}
    for weight in (0.0, REPLAY):
        sess = open_model(str(model_dir), device="cpu")
        cfg = WiseConfig(**{**LEARN, "edits_per_shard": 1, "shards_per_merge": 1, "replay_weight": weight})
        editor = WiseEditor(sess.model, sess.tokenizer, sess.mem, sess.blocks, sess.target.layer, cfg)
        editor.prepare()
        editor.apply(RECORDS[:1])
        first = sess.mem.memories[0].clone()
        batch, acts = editor._layer_inputs([RECORDS[0].prompt + " " + RECORDS[0].target_new])
        acts = acts.float()
        editor.apply(RECORDS[1:2])
        moved = torch.nn.functional.linear(acts, sess.mem.memories[0] - first).norm()
        changes[weight] = float(moved / torch.nn.functional.linear(acts, first).norm())
        if weight:
            assert sess.mem.replay_factor.shape[0] == sess.mem.in_features
            assert float(sess.mem.replay_count) > 0
        else:
            assert sess.mem.replay_factor.numel() == 0
    assert changes[REPLAY] < 0.5 * changes[0.0], changes


def test_rewordings_are_extra_rows_of_each_edit(model_dir):
    """n_rewordings adds that many training rows per edit, with the edit's answer."""
    sess = open_model(model_dir, device="cpu")
    rows = {}
    for n in (0, 3):
        cfg = WiseConfig(n_prefixes=2, n_rewordings=n)
        _editor, batch, row_edit, _base, _mask = _shard_setup(sess, cfg)
        rows[n] = int((row_edit == 0).sum())
        assert (batch.labels[row_edit >= 0] != -100).any(-1).all()  # every edit row has its answer
    assert rows == {0: 1 + len(PREFIXES), 3: 1 + len(PREFIXES) + 3}


def test_a_diverging_run_stops_with_an_error_and_writes_nothing(model_dir):
    """lr 5 with replay 10 blows up on these tiny models' curvature: the run must say so."""
    from wisecli.errors import TrainingDiverged
    sess = open_model(str(model_dir), device="cpu")
    cfg = WiseConfig(**{**LEARN, "learning_rate": 50.0, "replay_weight": 100.0, "edits_per_shard": 1,
                        "shards_per_merge": 1})
    editor = WiseEditor(sess.model, sess.tokenizer, sess.mem, sess.blocks, sess.target.layer, cfg)
    editor.prepare()
    with pytest.raises(TrainingDiverged, match="training diverged") as exc:
        editor.apply(RECORDS)
    assert "learning_rate" in exc.value.hint
    assert sess.mem.n_memories <= 1 and bool(torch.isfinite(sess.mem.memories).all())
