"""Per-example routing on tiny random checkpoints: each prompt in a batch takes its own
side memory or none, teacher-forced answers never sway the decision, and generation keeps
the decision the prompt made.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dataclasses import replace

import wisecli.runtime.router as router_module
from wisecli.batching import encode_pairs
from wisecli.app.session import open_model
from wisecli.runtime.router import NO_MEMORY

from wise_support import arch, logits as _logits, model_dir  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")


# ---- routing per example --------------------------------------------------------------


def _hand_set_memory(sess, a: str, b: str) -> tuple[float, float]:
    """One random side memory whose threshold sits between the scores of prompts a and b."""
    mem = sess.mem
    g = torch.Generator().manual_seed(0)
    memories = torch.randn(1, mem.out_features, mem.in_features, generator=g) * 0.1
    _set(mem, memories=memories, min_edit_scores=torch.zeros(1), thresholds=torch.zeros(1))
    scores = []
    for text in (a, b):
        _logits(sess.model, sess.tokenizer, [text])
        scores.append(float(mem.last_scores[0, 0]))
    assert abs(scores[0] - scores[1]) > 1e-3 * max(scores)
    _set(mem, thresholds=torch.tensor([sum(scores) / 2]))
    return scores[0], scores[1]


def _set(mem, subjects=None, **tensors) -> None:
    """Hand-set state, loaded the way a checkpoint's is."""
    mem.load_wise_state({**mem.wise_state(), **tensors},
                        mem.edit_subjects if subjects is None else subjects)


def test_routing_is_per_example(model_dir):
    sess = open_model(str(model_dir), device="cpu")
    a, b = "the capital of france is", "who plays music in the big city"
    sa, sb = _hand_set_memory(sess, a, b)
    want = [0 if sa > sb else NO_MEMORY, 0 if sb > sa else NO_MEMORY]

    batch = encode_pairs(sess.tokenizer, [a, b], [None, None])
    assert (batch.attention_mask == 0).any()  # one row is padded
    both = _logits(sess.model, sess.tokenizer, [a, b])
    assert sess.mem.last_route.tolist() == want
    with sess.mem.main_only():
        base = _logits(sess.model, sess.tokenizer, [a, b])
    for i, text in enumerate((a, b)):
        alone = _logits(sess.model, sess.tokenizer, [text])[0]
        assert sess.mem.last_route.tolist() == [want[i]]
        n = alone.shape[0]
        torch.testing.assert_close(both[i, -n:], alone, rtol=1e-4, atol=1e-5)
        if want[i] == NO_MEMORY:   # the unrouted row is the unedited model
            torch.testing.assert_close(both[i, -n:], base[i, -n:], rtol=1e-4, atol=1e-5)
        else:                      # the routed row really went through the side memory
            assert (both[i, -n:] - base[i, -n:]).abs().max() > 1e-3


def test_route_on_scores_the_query_only(model_dir):
    """Teacher-forced answer tokens never change the routing decision."""
    sess = open_model(str(model_dir), device="cpu")
    a, b = "the capital of france is", "who plays music in the big city"
    _hand_set_memory(sess, a, b)
    batch = encode_pairs(sess.tokenizer, [a, a], ["rome", "the old king of italy and spain"])
    with torch.no_grad():
        _logits(sess.model, sess.tokenizer, [a])
        alone = sess.mem.last_route.clone()
        with sess.mem.routing_on(batch.query_mask):
            sess.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids)
    assert sess.mem.last_route.tolist() == alone.tolist() * 2


# ---- generation holds the prompt's decision ------------------------------------------------


@pytest.mark.parametrize("hold", [True, False])
def test_generation_holds_prompt_routing(model_dir, monkeypatch, hold):
    sess = open_model(str(model_dir), device="cpu")
    a, b = "the capital of france is", "who plays music in the big city"
    _hand_set_memory(sess, a, b)
    tok = sess.tokenizer
    enc = tok([a, b], return_tensors="pt", padding=True, return_token_type_ids=False)
    position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        sess.model(**enc, position_ids=position_ids)
    plain = sess.mem.last_route.clone()
    assert sorted(plain.tolist()) == [NO_MEMORY, 0]  # one row routes, one does not

    real = router_module.choose_memory
    calls: list[int] = []

    def counting(scores, thresholds, rank=None):
        calls.append(scores.shape[-1])
        return real(scores, thresholds, rank)

    monkeypatch.setattr(router_module, "choose_memory", counting)
    sess.mem.configure(replace(sess.mem.router.cfg, hold=hold))
    new_tokens = 4
    with torch.no_grad():
        sess.model.generate(**enc, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            pad_token_id=tok.pad_token_id)
    if hold:
        assert len(calls) == 1                      # decided once, on the prompt
        assert torch.equal(sess.mem.held_route, plain)
        assert torch.equal(sess.mem.last_route, plain)  # and used for the last generated token
    else:
        assert len(calls) == new_tokens             # the control: every step re-decides


# ---- the subject gate ------------------------------------------------------------------------


def test_subject_gate_opens_a_memory_only_for_prompts_naming_its_subject(model_dir):
    """Every prompt clears the threshold here; the subject gate alone tells them apart, per
    row of a padded batch, and an edit without a subject leaves the decision to the keys."""
    sess = open_model(str(model_dir), device="cpu")
    texts = ["the capital of france is", "the capital of spain is", "who plays music in the big city"]
    _hand_set_memory(sess, texts[0], texts[2])
    mem = sess.mem
    _set(mem, [(0, "France")], thresholds=torch.zeros(1))
    for gate, want in ((False, [0, 0, 0]), (True, [0, NO_MEMORY, NO_MEMORY])):
        mem.configure(replace(mem.router.cfg, subject_gate=gate))
        _logits(sess.model, sess.tokenizer, texts)
        assert mem.last_route.tolist() == want, gate
    _set(mem, [(0, None)])  # no subject: the key gate decides (off here: all pass)
    _logits(sess.model, sess.tokenizer, texts)
    assert mem.last_route.tolist() == [0, 0, 0]


def test_subject_gate_holds_while_generating(model_dir):
    sess = open_model(str(model_dir), device="cpu")
    texts = ["the capital of france is", "the capital of spain is"]
    _hand_set_memory(sess, texts[0], texts[1])
    mem = sess.mem
    _set(mem, [(0, "france")], thresholds=torch.zeros(1))
    tok = sess.tokenizer
    enc = tok(texts, return_tensors="pt", padding=True, return_token_type_ids=False)
    for hold in (True, False):
        mem.configure(replace(mem.router.cfg, subject_gate=True, hold=hold))
        with torch.no_grad():
            sess.model.generate(**enc, do_sample=False, max_new_tokens=3, min_new_tokens=3,
                                pad_token_id=tok.pad_token_id)
        # the last step saw one new token, which names nothing: the prompt's answer stands
        assert mem.last_route.tolist() == [0, NO_MEMORY], hold


# ---- generation routed token by token -------------------------------------------------------


def _step(sess, ids: list[int], cache, mask: torch.Tensor):
    """One model call on ``ids`` after ``cache``; the route the layer took."""
    mask = torch.cat([mask, torch.ones(1, len(ids), dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        out = sess.model(input_ids=torch.tensor([ids]), attention_mask=mask, cache=cache, use_cache=True)
    return int(sess.mem.last_route[0]), out.past_key_values, mask


def test_a_memory_answers_its_target_then_rests_until_the_sentence_ends(model_dir):
    """Not held: the memory keeps answering while the text follows its edit's target, is shut
    once the target is written (no repetition), and opens again in a new sentence that names
    the subject."""
    sess = open_model(str(model_dir), device="cpu")
    prompt = "the capital of france is"
    _hand_set_memory(sess, prompt, "who plays music in the big city")
    mem, tok = sess.mem, sess.tokenizer
    mem.load_wise_state({**mem.wise_state(), "thresholds": torch.zeros(1)}, [(0, "france")], [(0, "paris city")])
    mem.configure(replace(mem.router.cfg, subject_gate=True, hold=False))

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    route, cache, mask = _step(sess, ids(prompt), None, torch.zeros(1, 0, dtype=torch.long))
    assert route == 0
    target = ids(" paris city")
    seen = []
    for t in target + ids(" and the capital of france is"):
        route, cache, mask = _step(sess, [t], cache, mask)
        seen.append(route)
    # while the target is written the memory answers; after it, shut though France is named
    assert seen[:len(target) - 1] == [0] * (len(target) - 1)
    assert set(seen[len(target):]) == {NO_MEMORY}
    seen = []
    for t in ids(". the capital of france is"):  # a sentence boundary opens it again
        route, cache, mask = _step(sess, [t], cache, mask)
        seen.append(route)
    assert seen[-1] == 0


@pytest.mark.parametrize("blocks", ["checked", "from the memory's block"])
def test_once_the_target_is_written_the_cache_is_the_unedited_models(model_dir, blocks):
    """The memory acted on every prompt position, so the cached states above its layer carry
    the edit and would pull the answer back in ("Essex Essex Essex"); once the answer is
    written the row's cache is recomputed without the memory.  The first refresh checks that
    rerunning only the blocks from the memory's up agrees with rerunning all; later ones
    rerun only those."""
    sess = open_model(str(model_dir), device="cpu", layer=1)  # layers above it hold a cache the edit reaches
    refresher = sess.mem.installed.refresher
    assert refresher.index == 1 and refresher.fast is None
    if blocks != "checked":
        refresher.fast = True
    prompt = "the capital of france is"
    _hand_set_memory(sess, prompt, "who plays music in the big city")
    mem, tok = sess.mem, sess.tokenizer
    mem.load_wise_state({**mem.wise_state(), "thresholds": torch.zeros(1)}, [(0, "france")], [(0, "paris city")])
    mem.configure(replace(mem.router.cfg, subject_gate=True, hold=False))
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    target = tok(" paris city", add_special_tokens=False)["input_ids"]
    assert len(target) >= 2

    def unedited_cache(tokens: list[int]):
        with mem.main_only(), torch.no_grad():
            return sess.model(input_ids=torch.tensor([tokens]), use_cache=True).past_key_values

    def differs(cache, tokens: list[int]) -> float:
        plain = unedited_cache(tokens)
        return max(float((a.keys - b.keys).abs().max()) for a, b in zip(cache.layers, plain.layers))

    route, cache, mask = _step(sess, ids, None, torch.zeros(1, 0, dtype=torch.long))
    assert route == 0
    for t in target[:-1]:
        route, cache, mask = _step(sess, [t], cache, mask)
        assert route == 0
    assert differs(cache, ids + target[:-1]) > 1e-3  # the answer is being written: edited states
    first_block = []
    handle = refresher.blocks[0].register_forward_hook(lambda *_: first_block.append(1))
    route, cache, mask = _step(sess, [target[-1]], cache, mask)
    handle.remove()
    assert route == NO_MEMORY
    assert differs(cache, ids + target) < 1e-4
    assert refresher.fast is True
    # the step itself, plus the full rerun only when checking
    assert len(first_block) == (2 if blocks == "checked" else 1)


def test_the_cache_is_refreshed_only_for_the_rows_that_wrote_their_answer(model_dir):
    """In a left-padded batch, a row that wrote its target gets the unedited cache; a row the
    memory also answered, writing something else, keeps its own."""
    sess = open_model(str(model_dir), device="cpu", layer=1)
    a, b = "the capital of france is", "in france the best city of all is"
    _hand_set_memory(sess, a, "who plays music in the big city")
    mem, tok = sess.mem, sess.tokenizer
    mem.load_wise_state({**mem.wise_state(), "thresholds": torch.zeros(1)}, [(0, "france")], [(0, "paris city")])
    mem.configure(replace(mem.router.cfg, subject_gate=True, hold=False))
    target = tok(" paris city", add_special_tokens=False)["input_ids"]
    other = tok(" the sea and", add_special_tokens=False)["input_ids"][:len(target)]
    assert len(other) == len(target) and other[0] != target[0]
    tok.padding_side = "left"
    enc = tok([a, b], return_tensors="pt", padding=True, add_special_tokens=False)
    assert (enc["attention_mask"] == 0).any()
    mask = enc["attention_mask"]
    with torch.no_grad():
        out = sess.model(**enc, use_cache=True)
        assert mem.last_route.tolist() == [0, 0]
        cache = out.past_key_values
        for ta, tb in zip(target, other):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
            positions = mask.long().cumsum(-1)[:, -1:] - 1
            cache = sess.model(input_ids=torch.tensor([[ta], [tb]]), attention_mask=mask, position_ids=positions,
                               cache=cache, use_cache=True).past_key_values
    assert mem.last_route.tolist() == [NO_MEMORY, 0]
    with mem.main_only(), torch.no_grad():
        ids = torch.cat([enc["input_ids"], torch.tensor([target, other])], dim=1)
        plain = sess.model(input_ids=ids, attention_mask=mask,
                           position_ids=(mask.long().cumsum(-1) - 1).clamp(min=0), use_cache=True).past_key_values
    real = mask.bool()
    gap = [max(float((c.keys[r][:, real[r]] - p.keys[r][:, real[r]]).abs().max())
               for c, p in zip(cache.layers, plain.layers)) for r in range(2)]
    assert gap[0] < 1e-4 < 1e-3 < gap[1]


def test_installing_again_or_taking_the_memory_out_leaves_no_stray_hooks(model_dir):
    """The bench swaps the memory in and out many times; each install must replace, not add,
    the model hook and the block hook that records for the cache refresh."""
    from wisecli.runtime.memory import install, uninstall
    sess = open_model(str(model_dir), device="cpu", layer=1)
    block = sess.mem.installed.refresher.blocks[1]
    def counts():
        return len(block._forward_pre_hooks), len(sess.model._forward_pre_hooks), len(sess.model._forward_hooks)
    before = counts()
    install(sess.model, sess.mem)
    install(sess.model, sess.mem)
    assert counts() == before
    uninstall(sess.model)
    assert counts() == (before[0] - 1, before[1] - 1, before[2] - 1)
    assert sess.mem.installed is None and not any(k.startswith("_wise") for k in vars(sess.model))


def _greedy_steps(sess, prompts: list[str], n: int):
    """A hand-written greedy decoding loop, one step per ``next()``: yields each step's tokens."""
    tok = sess.tokenizer
    enc = tok(prompts, return_tensors="pt", padding=True, return_token_type_ids=False)
    mask = enc["attention_mask"]
    with torch.no_grad():
        out = sess.model(**enc, use_cache=True)
    for _ in range(n):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        yield nxt[:, 0].tolist()
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        with torch.no_grad():
            out = sess.model(input_ids=nxt, attention_mask=mask, cache=out.cache,
                             use_cache=True)


def test_two_generations_interleaved_each_keep_their_own_routing_state():
    """Each decode step finds its generation by the cache it is given, not by the batch's shape:
    two generations of the same batch size, stepped in turn, write what each writes alone
    (a checkpoint whose memories answer, follow their targets and refresh the cache)."""
    sess = open_model(str(Path(__file__).parent / "data" / "compat-v2" / "merge"), device="cpu")
    first = ["the capital of france is", "the queen lives in", "the king lives in"]
    second = ["the author of hamlet was", "the blue river is in", "the capital of spain is"]
    alone = [list(zip(*_greedy_steps(sess, p, 8))) for p in (first, second)]
    a, b = _greedy_steps(sess, first, 8), _greedy_steps(sess, second, 8)
    together = [[], []]
    for _ in range(8):
        together[0].append(next(a))
        together[1].append(next(b))
    assert [list(zip(*t)) for t in together] == alone
    assert any(r >= 0 for r in sess.mem.answered_route.tolist())
