"""Subspace shards: each shard writes through random input directions, so a checkpoint stores
its factor alone and rebuilds the memory from it (``memory.memories_from_shards``).

On tiny random checkpoints (both architectures): the edits are learned, the stored state holds
factors instead of memories, and a reopened checkpoint routes and answers bit for bit as the run.
"""
from __future__ import annotations

import pytest
import torch

from wisecli.app.checkpoint import write_checkpoint
from wisecli.app.metrics import evaluate
from wisecli.app.pipeline import after_run
from wisecli.app.session import open_model
from wisecli.errors import CheckpointError
from wisecli.methods.wise.config import WiseConfig
from wisecli.methods.wise.editor import WiseEditor
from wisecli.runtime.maths import shard_signs, shard_subspace, subspace_memory
from wisecli.runtime.stored import memories_from_shards, runtime_state, stored_state

from test_wise import LEARN, RECORDS, UNEDITED
from wise_support import ARCHS, arch_dir, logits as _logits, route as _route

pytestmark = pytest.mark.usefixtures("single_thread")


def test_shard_directions_depend_on_the_seed_alone():
    a = shard_signs(16, 256, seed=5)
    assert torch.equal(a, shard_signs(16, 256, seed=5))
    assert not torch.equal(a, shard_signs(16, 256, seed=6))
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(a.mean())) < 0.05
    # the directions a stored checkpoint is rebuilt from must never change with torch's generators
    assert shard_signs(1, 12, seed=0).tolist() == [[1.0, -1.0, -1.0, 1.0, -1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 1.0]]
    unit = a / a.norm(dim=1, keepdim=True)
    off = unit @ unit.T - torch.eye(16)
    assert float(off.abs().max()) < 0.3  # near-orthogonal rows, as random directions are


def test_a_step_through_the_subspace_moves_activations_as_far_as_the_mask():
    """E[AᵀA] = ratio·I: τ·A moves an activation a by ratio × what τ would at full rank."""
    a = shard_subspace(64, 512, seed=1, ratio=0.2)
    x = torch.randn(400, 512, generator=torch.Generator().manual_seed(0))
    kept = ((x @ a.T).pow(2).sum(1) / x.pow(2).sum(1)).mean()
    assert float(kept) == pytest.approx(0.2, rel=0.05)


@pytest.fixture(scope="module", params=ARCHS)
def edited(request, single_thread):
    sess = open_model(str(arch_dir(request, request.param)), device="cpu")
    cfg = WiseConfig(**{**LEARN, "shard_rank": 32, "edits_per_shard": 2})
    editor = WiseEditor(sess.model, sess.tokenizer, sess.mem, sess.blocks, sess.target.layer, cfg)
    editor.prepare()
    placed = editor.apply(RECORDS)
    return sess, cfg, editor, placed


def test_subspace_shards_learn_the_edits_into_a_memory_their_factors_make(edited):
    sess, cfg, editor, placed = edited
    mem = sess.mem
    assert [p["shard"] for p in placed] == [0, 0, 1] and mem.n_memories == 1
    assert tuple(mem.shard_factors.shape) == (2, mem.out_features, 32)
    assert mem.shard_memory.tolist() == [0, 0]
    assert torch.equal(mem.memories, memories_from_shards(mem.wise_state()))
    report = evaluate(sess.model, sess.tokenizer, mem, RECORDS, generate=False)
    assert report.reliability >= 0.66 and all(e.routed for e in report.edits)
    # the memory reads only the shards' directions: nothing along an orthogonal input
    directions = torch.cat([shard_signs(32, mem.in_features, int(s)) for s in mem.shard_seeds])
    q, _ = torch.linalg.qr(torch.cat([directions.T, mem.basis], 1))
    other = torch.randn(mem.in_features, generator=torch.Generator().manual_seed(0))
    other = other - q @ (q.T @ other)
    assert float((mem.memories[0] @ other).norm()) < 1e-3 * float(other.norm())


def test_a_checkpoint_stores_factors_not_memories_and_answers_the_same(edited, tmp_path, wise_cache):
    sess, cfg, editor, placed = edited
    tensors, _ = editor.saved()
    assert "memories" not in tensors and tensors["shard_factors"].dtype == torch.float16
    full = sess.mem.memories.numel() * 2
    assert tensors["shard_factors"].numel() * 2 < full  # fewer bytes than the 16-bit memory
    out = tmp_path / "patched"
    manifest = after_run(sess, cfg, editor.state.to_dict(), RECORDS, placed, None, "edits.jsonl", 1.0)
    write_checkpoint(out, base_dir=sess.base_dir, tensors=tensors, manifest=manifest)
    again = open_model(str(out), device="cpu")
    for name, t in sess.mem.wise_state().items():
        assert torch.equal(again.mem.wise_state()[name], t), name
    for text in (RECORDS[0].prompt, RECORDS[2].prompt, UNEDITED):
        assert torch.equal(_logits(again.model, again.tokenizer, [text]), _logits(sess.model, sess.tokenizer, [text]))
        assert torch.equal(_route(again, text), _route(sess, text)), text


def test_a_memory_holding_more_than_its_shards_is_stored_whole(edited):
    """A masked memory (an older checkpoint's) that later takes subspace shards keeps what it
    held: it cannot be rebuilt from factors, so the checkpoint stores it, and not the factors."""
    sess, *_ = edited
    state = {k: v.clone() for k, v in sess.mem.wise_state().items()}
    state["memories"] = state["memories"] + 0.5
    stored = stored_state(state)
    assert "memories" in stored and stored["shard_factors"].shape[0] == stored["shard_seeds"].numel() == 0
    assert torch.equal(runtime_state(stored)["memories"], state["memories"])


def test_a_layer_adds_new_shards_to_a_masked_memory(edited):
    sess, *_ = edited
    mem = sess.mem
    saved = {k: v.clone() for k, v in mem.wise_state().items()}
    try:
        old = torch.full_like(mem.memories[0], 0.25)
        mem.memories[0] = old
        factors = torch.randn(1, mem.out_features, 32)
        got = mem.add_shards(0, factors, torch.tensor([99]))
        want = (old + subspace_memory(factors.half().float(), torch.tensor([99]), mem.basis)).half().float()
        assert torch.equal(got, want)
    finally:
        mem.load_wise_state(saved, mem.edit_subjects, mem.edit_targets)


def test_shards_pointing_past_the_memories_are_a_damaged_checkpoint(edited, tmp_path, wise_cache):
    from wisecli.methods.wise.state import check_state
    sess, cfg, editor, placed = edited
    tensors, _ = editor.saved()
    manifest = after_run(sess, cfg, editor.state.to_dict(), RECORDS, placed, None, "edits.jsonl", 1.0)
    bad = {**tensors, "shard_memory": torch.tensor([0, 3])}
    with pytest.raises(CheckpointError, match="shard"):
        check_state(manifest, bad, "wise.safetensors")


def test_plain_transformers_rebuilds_the_memories_from_the_factors(edited, tmp_path, wise_cache):
    """The checkpoint's ``modeling_wise.py`` (no wisecli) rebuilds the memories from the stored
    factors and answers exactly as the run did."""
    from transformers import AutoModelForCausalLM

    sess, cfg, editor, placed = edited
    tensors, _ = editor.saved()
    out = tmp_path / "patched"
    manifest = after_run(sess, cfg, editor.state.to_dict(), RECORDS, placed, None, "edits.jsonl", 1.0)
    write_checkpoint(out, base_dir=sess.base_dir, tensors=tensors, manifest=manifest)
    model = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True)
    texts = [RECORDS[0].prompt, RECORDS[1].prompt, UNEDITED]
    assert torch.equal(_logits(model, sess.tokenizer, texts), _logits(sess.model, sess.tokenizer, texts))
    layer = model.get_submodule(sess.target.module_path)
    assert torch.equal(layer.memories, sess.mem.memories)
