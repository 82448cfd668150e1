"""What a shard records once: rows run in groups of like length give what one padded batch
gives.  ``length_groups`` as a pure function, then recording and training on tiny models with
the rows split into groups against all in one batch."""
from __future__ import annotations

import pytest
import torch

import wisecli.methods.wise.recorded as recorded
from wisecli.app.session import open_model
from wisecli.batching import length_groups
from wisecli.methods.wise.config import WiseConfig
from wisecli.methods.wise.editor import WiseEditor
from wisecli.methods.wise.recorded import record_inputs
from wisecli.methods.wise.train import train_shard
from wisecli.records import EditRecord
from wisecli.runtime.maths import shard_mask

from conftest import EDITS
from wise_support import ARCHS, arch, arch_dir  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")


def _padded(lengths: torch.Tensor, groups: list[torch.Tensor]) -> int:
    return sum(len(g) * int(lengths[g].max()) for g in groups)


def test_length_groups_split_a_short_and_a_long_kind_of_row():
    """A shard's bare prompts (about 10 tokens) and chat turns (about 50): two groups, each
    row in exactly one, far fewer padded tokens than one batch."""
    lengths = torch.tensor([9, 52, 10, 11, 48, 10, 9, 55, 12, 10] * 4)
    groups = length_groups(lengths, overhead=64)
    assert len(groups) == 2
    assert sorted(torch.cat(groups).tolist()) == list(range(len(lengths)))
    assert int(lengths[groups[0]].max()) <= 12 and int(lengths[groups[1]].min()) >= 48
    assert _padded(lengths, groups) < 0.5 * len(lengths) * int(lengths.max())  # 996 of 2,200


def test_length_groups_keep_one_batch_where_a_call_costs_more_than_its_padding():
    assert len(length_groups(torch.tensor([20, 21, 22, 23, 24]), overhead=64)) == 1
    assert len(length_groups(torch.tensor([7] * 30), overhead=0)) == 1
    assert length_groups(torch.zeros(0, dtype=torch.long)) == []
    many = torch.arange(1, 200, 7)  # every length apart: the group count is capped
    assert len(length_groups(many, overhead=0, max_groups=3)) == 3


def _shard(sess):
    cfg = WiseConfig(max_steps=5, min_steps=5, check_every=5, n_prefixes=2, negatives_per_step=2,
                     variants_per_step=2, learning_rate=0.05)
    editor = WiseEditor(sess.model, sess.tokenizer, sess.mem, sess.blocks, sess.target.layer, cfg)
    editor.state.prefixes = ["the old king .", "a big sea . the moon and the sun and the green lake ."]
    editor.state.negatives = ["the river of germany", "my song is red"]
    sess.mem.calibrate(*editor.measure_scale(editor.state.negatives))
    records = [EditRecord(id=e["id"], prompt=e["prompt"], target_new=e["target_new"]) for e in EDITS]
    batch, row_edit = editor.shard_batch(records)
    base = torch.zeros(sess.mem.out_features, sess.mem.in_features)
    return cfg, batch, row_edit, base, shard_mask(base.shape, 0.5, seed=3)


def test_rows_recorded_in_groups_train_what_one_batch_trains(request, arch, monkeypatch):
    """Recording split into three groups of rows against one padded batch: the same inputs to
    the memory at every real position, and the same shard trained from them."""
    sess = open_model(str(arch_dir(request, arch)), device="cpu", layer=2)
    cfg, batch, row_edit, base, mask = _shard(sess)
    lengths = batch.attention_mask.sum(-1)
    assert int(lengths.max()) > 2 * int(lengths.min())  # rows of unlike length: there is padding to skip
    runs = {}
    for name, split in (("one", lambda ls: [torch.arange(len(ls))]),
                        ("three", lambda ls: list(torch.argsort(ls).chunk(3)))):
        monkeypatch.setattr(recorded, "length_groups", split)
        rec = record_inputs(sess.model, sess.blocks, sess.mem, 2, batch)
        res = train_shard(sess.model, sess.mem, sess.blocks, 2, batch, row_edit, base, mask, cfg)
        runs[name] = rec, res
    (rec1, res1), (rec3, res3) = runs["one"], runs["three"]
    real = batch.attention_mask.bool()
    torch.testing.assert_close(rec3.acts[real], rec1.acts[real], rtol=1e-4, atol=1e-5)
    assert res3.steps == res1.steps
    assert ((res3.delta - res1.delta).norm() / res1.delta.norm()).item() <= 1e-4


def test_keys_read_from_the_recording_are_those_a_second_pass_computes(request, arch):
    """Router keys and answer keys (the bare prompt, its chat turns) taken from the rows the
    shards recorded for training equal what running the prompts again gives, across a merge
    group of two shards whose batches differ in width."""
    from wisecli.runtime.maths import from_fp8_keys, fp8_keys, loudest_tokens
    sess = open_model(str(arch_dir(request, arch)), device="cpu", layer=2)
    tok = sess.tokenizer
    tok.chat_template = ("the old king . {% for m in messages %}{{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}the moon {% endif %}")
    cfg = WiseConfig(max_steps=5, min_steps=5, check_every=5, n_prefixes=2, negatives_per_step=2,
                     variants_per_step=2, learning_rate=0.05, edits_per_shard=1, shards_per_merge=2,
                     other_relations=0)
    editor = WiseEditor(sess.model, tok, sess.mem, sess.blocks, sess.target.layer, cfg)
    editor.state.prefixes = ["the old king .", "a big sea . the moon and the sun and the green lake ."]
    editor.state.negatives = ["the river of germany", "my song is red"]
    sess.mem.calibrate(*editor.measure_scale(editor.state.negatives))
    records = [EditRecord(id=e["id"], prompt=e["prompt"], target_new=e["target_new"]) for e in (EDITS[0], EDITS[2])]
    assert len({len(tok(r.prompt)["input_ids"]) for r in records}) == 2  # the two shards' widths differ
    recompute = editor._answer_keys
    editor._answer_keys = lambda _edits: pytest.fail("answer keys run again instead of read from the recording")
    editor.apply(records)
    editor._answer_keys = recompute
    mem = sess.mem

    def stored(x: torch.Tensor) -> torch.Tensor:
        return from_fp8_keys(*fp8_keys(x))
    answers = editor._answer_keys(records)
    assert answers.shape[1] == 3 and mem.answer_keys.shape[0] == 2 * 3  # prompt and two chat turns
    cos = torch.nn.functional.cosine_similarity(mem.answer_keys.float(), stored(answers.reshape(-1, answers.shape[-1])), dim=-1)
    assert float(cos.min()) > 0.999
    batch, raw = editor._layer_inputs([r.prompt for r in records])
    keys, real = loudest_tokens(raw.float(), batch.query_mask, mem.memories[0], cfg.keys_per_edit)
    assert mem.edit_keys.shape[0] == int(real.sum())
    cos = torch.nn.functional.cosine_similarity(mem.edit_keys.float(), stored(keys[real]), dim=-1)
    assert float(cos.min()) > 0.999
