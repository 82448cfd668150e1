"""The router: its maths as pure functions (top-1 choice, key similarity and coverage), and
the layer routing hand-set memories through it (gates, ranking, many memories, decoding).
Routing inside real models, per example and while generating, is in test_routing.py."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from wisecli.runtime.maths import activation_score
from wisecli.runtime.memory import SideMemoryLayer
from wisecli.runtime.gates import NO_MEMORY, choose_memory, key_coverage, key_similarity
from wisecli.runtime.router import SELECTIVE_FROM, RouterConfig

PLAIN = RouterConfig.plain()  # scores alone, mean pooling: what an unconfigured layer does


def _layer(d_in: int, d_out: int, routing: RouterConfig = PLAIN, **state: torch.Tensor) -> SideMemoryLayer:
    """A layer over a random projection with hand-set state, loaded the way a checkpoint is."""
    mem = SideMemoryLayer(torch.nn.Linear(d_in, d_out, bias=False), "linear", d_in, d_out)
    mem.load_wise_state({**mem.wise_state(), **state})
    mem.configure(routing)
    return mem


# ---- choose_memory ---------------------------------------------------------------


def test_choose_memory_picks_widest_clearance_of_its_threshold():
    # (K=3, B=5)
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.2, 2.0],
                           [0.8, 0.3, 0.7, 0.1, 0.1],
                           [1.0, 0.2, 0.6, 0.3, 3.0]])
    thresholds = torch.tensor([0.5, 0.2, 2.0])
    route = choose_memory(scores, thresholds)
    # row 0: memory 2 has the top score but not above its threshold 2.0; memory 1 clears
    #        0.2 by 4x, memory 0 clears 0.5 by 1.8x -> memory 1, though 0.8 < 0.9
    # row 1: only memory 1 clears (0.3 > 0.2); row 2: memory 1 (0.7 > 0.2; 0.5 is not > 0.5)
    # row 3: nothing clears -> main memory
    # row 4: memory 0 clears by 4x, memory 2 by 1.5x -> memory 0, though 3.0 is the top score
    assert route.tolist() == [1, 1, 1, NO_MEMORY, 0]
    assert route.dtype == torch.long


def test_choose_memory_none_clears():
    route = choose_memory(torch.tensor([[0.1, 0.2]]), torch.tensor([0.5]))
    assert route.tolist() == [NO_MEMORY, NO_MEMORY]


def test_choose_memory_threshold_is_strict():
    assert choose_memory(torch.tensor([[0.5]]), torch.tensor([0.5])).tolist() == [NO_MEMORY]


def test_choose_memory_with_no_memories():
    route = choose_memory(torch.zeros(0, 3), torch.zeros(0))
    assert route.tolist() == [NO_MEMORY] * 3
    assert route.dtype == torch.long


def test_choose_memory_rows_route_independently():
    scores = torch.tensor([[2.0, 0.0, 0.4], [0.0, 3.0, 0.6]])
    assert choose_memory(scores, torch.tensor([1.0, 0.5])).tolist() == [0, 1, 1]
    for b in range(3):  # the same decision as each row alone
        alone = choose_memory(scores[:, b:b + 1], torch.tensor([1.0, 0.5]))
        assert alone.item() == [0, 1, 1][b]


# ---- keys ----------------------------------------------------------------------------


def test_key_similarity_best_token_and_key_per_memory():
    keys = F.normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]), dim=-1)
    key_memory = torch.tensor([0, 0, 1])
    # row 0: first token (the sink) would match memory 1 exactly but is not scored;
    # its second token lies between keys 0 and 1, its third on key 1.
    acts = torch.tensor([[[0, 0, 5.0], [1.0, 1.0, 0], [0, 2.0, 0]],
                         [[9.0, 9.0, 9.0], [0, 0, 3.0], [0, 0, 0]]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    sims = key_similarity(acts, mask, keys, key_memory, n_memories=3)
    assert sims.shape == (3, 2)
    torch.testing.assert_close(sims[0], torch.tensor([1.0, 0.0]))  # memory 0, per row
    torch.testing.assert_close(sims[1], torch.tensor([0.0, 1.0]))
    assert (sims[2] == -1).all()  # a memory without keys


def test_key_coverage_prefers_the_edit_a_prompt_matches_on_most_keys():
    """Memory 0 holds an edit keyed on axes 0, 1, 2; memory 1 one keyed on axes 3, 4.
    The prompt is close to axes 0 and 1 and exactly on axis 3 (a word both share): the
    closest single key is memory 1's, but memory 0's edit is the one the prompt covers."""
    eye = torch.eye(5)
    keys = eye.clone()
    key_edit, key_memory = torch.tensor([0, 0, 0, 1, 1]), torch.tensor([0, 0, 0, 1, 1])
    # the first token (the sink) sits on axis 4 and must not count
    tokens = torch.stack([7 * eye[4], eye[0] + 0.3 * eye[2], eye[1] + 0.3 * eye[2], eye[3]])[None]
    mask = torch.ones(1, 4)
    sims = key_similarity(tokens, mask, keys, key_memory, n_memories=2)
    cover = key_coverage(tokens, mask, keys, key_edit, key_memory, n_memories=2)
    assert int(sims[:, 0].argmax()) == 1 and float(sims[1, 0]) == pytest.approx(1.0)
    near = 1 / (1 + 0.3 ** 2) ** 0.5
    assert float(cover[0, 0]) == pytest.approx((near + near + 0.3 * near) / 3, rel=1e-5)
    assert float(cover[1, 0]) == pytest.approx((1.0 + 0.0) / 2)
    assert int(cover[:, 0].argmax()) == 0
    # a memory takes its best edit: with axis 3 a whole edit of its own, it is fully covered
    cover3 = key_coverage(tokens, mask, keys, torch.tensor([0, 0, 0, 1, 2]), key_memory, n_memories=2)
    assert float(cover3[1, 0]) == pytest.approx(1.0)


# ---- the layer routing through the router ------------------------------------------


def test_layer_ranks_the_memories_that_pass_by_coverage():
    """The memories and prompt above, in the layer: both pass the key gate and clear their
    thresholds; the closest single key is memory 1's, coverage picks memory 0."""
    eye = torch.eye(5)
    key_edit = torch.tensor([0, 0, 0, 1, 1])
    mem = _layer(5, 3, replace(PLAIN, key_gate=0.9), memories=torch.ones(2, 3, 5),
                 thresholds=torch.tensor([0.1, 0.1]), edit_keys=eye.half(), key_edit=key_edit, key_memory=key_edit)
    a = torch.stack([7 * eye[4], eye[0] + 0.3 * eye[2], eye[1] + 0.3 * eye[2], eye[3]])[None]
    mem(a)
    assert mem.last_route.tolist() == [0]
    assert int(key_similarity(a, None, eye, key_edit, 2)[:, 0].argmax()) == 1


def test_coverage_gate_shuts_a_memory_matched_on_one_key_only():
    """One edit keyed on axes 0, 1, 2.  A near miss shares one of its words exactly (axis 0,
    the template); the edit's own rephrase is close to all three.  The key gate passes both;
    a coverage gate of 0.6 passes only the rephrase."""
    eye = torch.eye(5)
    state = dict(memories=torch.ones(1, 3, 5), thresholds=torch.tensor([0.1]), edit_keys=eye[:3].half(),
                 key_edit=torch.tensor([0, 0, 0]), key_memory=torch.tensor([0, 0, 0]))
    sink = 7 * eye[4]
    near_miss = torch.stack([sink, eye[0], eye[3], eye[3] + 0.1 * eye[4]])
    rephrase = torch.stack([sink, eye[0] + 0.2 * eye[3], eye[1] + 0.2 * eye[3], eye[2] + 0.2 * eye[4]])
    a = torch.stack([near_miss, rephrase])
    mem = _layer(5, 3, replace(PLAIN, key_gate=0.9), **state)
    mem(a)
    assert mem.last_route.tolist() == [0, 0]
    mem.configure(replace(PLAIN, key_gate=0.9, coverage_gate=0.6))
    mem(a)
    assert mem.last_route.tolist() == [NO_MEMORY, 0]


def test_key_gate_keeps_memory_off_prompts_unlike_its_keys():
    state = dict(memories=torch.ones(1, 2, 4), thresholds=torch.tensor([0.5]),
                 edit_keys=torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float16),
                 key_edit=torch.tensor([0]), key_memory=torch.tensor([0]))
    a = torch.tensor([[[0, 0, 0, 1.0], [3.0, 0, 0, 0]],   # second token is the key: routed
                      [[0, 0, 0, 1.0], [0, 3.0, 0, 0]]])  # orthogonal to it: gated off
    mem = _layer(4, 2, **state)
    mem(a)
    assert mem.last_route.tolist() == [0, 0]  # no gate: the score alone routes both
    mem.configure(replace(PLAIN, key_gate=0.9))
    mem(a)
    assert mem.last_route.tolist() == [0, NO_MEMORY]


def test_answer_gate_opens_for_the_edit_whose_answer_position_matches():
    """Two edits of one memory, subjects "france" and "spain", answer keys on axes 0 and 1.  A
    prompt naming france opens the memory only where its last token lies on france's own
    axis: spain's relation asked about france (axis 1) stays out, as does france's relation
    asked about a subject the memory does not hold.  Padding is not a prompt's last token."""
    from conftest import make_tokenizer
    tok = make_tokenizer()
    mem = SideMemoryLayer(torch.nn.Linear(4, 2, bias=False), "linear", 4, 2, tokenizer=tok)
    mem.load_wise_state({**mem.wise_state(), "memories": torch.ones(1, 2, 4), "thresholds": torch.tensor([0.01]),
                         "answer_keys": torch.eye(4)[:2].half(), "answer_key_edit": torch.tensor([0, 1])},
                        subjects=[(0, "france"), (0, "spain")], targets=[(0, "x"), (0, "y")])
    cfg = RouterConfig(pooling="max", hold=True, key_gate=0.0, coverage_gate=0.0, subject_gate=True, answer_gate=0.8)
    mem.configure(cfg)
    texts = ["the capital of france is", "the language of france is", "the capital of italy is"]
    ids = tok(texts, return_tensors="pt", padding=True, padding_side="right")
    t = ids["input_ids"].shape[1]
    last = ids["attention_mask"].sum(1) - 1
    a = torch.zeros(3, t, 4)
    a[:, :, 3] = 1.0  # every other token: off both keys
    a[0, last[0]] = torch.tensor([1.0, 0.1, 0, 0])  # france's relation
    a[1, last[1]] = torch.tensor([0.1, 1.0, 0, 0])  # spain's relation, about france
    a[2, last[2]] = torch.tensor([1.0, 0.0, 0, 0])  # france's relation, about italy
    mem.begin_call(ids["input_ids"], ids["attention_mask"], decoding=False)
    mem(a)
    assert mem.last_route.tolist() == [0, NO_MEMORY, NO_MEMORY]
    mem.configure(replace(cfg, answer_gate=0.0))  # the subject gate alone opens both france rows
    mem.begin_call(ids["input_ids"], ids["attention_mask"], decoding=False)
    mem(a)
    assert mem.last_route.tolist() == [0, 0, NO_MEMORY]


def test_an_edit_stays_shut_where_another_relation_of_its_subject_is_nearer():
    """One edit, subject "france", its answer key on axis 0 and an other key (another relation
    of france) on axis 1.  Both prompts name france and both answer positions are within the
    gate's cosine of the answer key; the one nearer the other key stays out.  Without other
    keys (a format-6 checkpoint) both open, as they did."""
    from conftest import make_tokenizer
    tok = make_tokenizer()
    mem = SideMemoryLayer(torch.nn.Linear(4, 2, bias=False), "linear", 4, 2, tokenizer=tok)
    state = {**mem.wise_state(), "memories": torch.ones(1, 2, 4), "thresholds": torch.tensor([0.01]),
             "answer_keys": torch.eye(4)[:1].half(), "answer_key_edit": torch.tensor([0])}
    others = {"other_keys": torch.eye(4)[1:2].half(), "other_key_edit": torch.tensor([0])}
    cfg = RouterConfig(pooling="max", hold=True, key_gate=0.0, coverage_gate=0.0, subject_gate=True, answer_gate=0.5)
    texts = ["the capital of france is", "the language of france is"]
    ids = tok(texts, return_tensors="pt", padding=True, padding_side="right")
    last = ids["attention_mask"].sum(1) - 1
    a = torch.zeros(2, ids["input_ids"].shape[1], 4)
    a[:, :, 3] = 1.0
    a[0, last[0]] = torch.tensor([1.0, 0.6, 0, 0])  # cosine 0.86 with its own key, 0.51 with the other
    a[1, last[1]] = torch.tensor([0.7, 1.0, 0, 0])  # cosine 0.57 with its own key, 0.82 with the other
    routes = []
    for extra in (others, {}):
        mem.load_wise_state({**state, **extra}, subjects=[(0, "france")], targets=[(0, "x")])
        mem.configure(cfg)
        mem.begin_call(ids["input_ids"], ids["attention_mask"], decoding=False)
        mem(a)
        routes.append(mem.last_route.tolist())
    assert routes == [[0, NO_MEMORY], [0, 0]]


def test_many_memories_computed_only_where_routable_give_the_same_outputs():
    """Retrieve mode with many memories skips D_k a for gated-off memories; nothing may change."""
    torch.manual_seed(0)
    k_mem, d_in, d_out = 12, 16, 6
    assert k_mem >= SELECTIVE_FROM
    keys = torch.randn(k_mem, d_in)
    mem = _layer(d_in, d_out, replace(PLAIN, key_gate=0.9), memories=torch.randn(k_mem, d_out, d_in),
                 thresholds=torch.full((k_mem,), 0.5), edit_keys=keys.half(), key_edit=torch.arange(k_mem),
                 key_memory=torch.arange(k_mem))
    a = torch.randn(5, 3, d_in)
    a[0, 2], a[1, 1], a[3, 2] = 4 * keys[3], 2 * keys[7], 3 * keys[7]  # rows 2 and 4: no key
    mask = torch.ones(5, 3)
    cache = _Cache()  # what a generation's decode steps are handed
    mem.begin_call(None, mask, decoding=False)
    out = mem(a)
    mem.end_call(cache)
    # the reference: every memory's output and score, the gate, then top-1 routing
    deltas = torch.stack([F.linear(a, mem.memories[k]) for k in range(k_mem)])
    sims = key_similarity(a, mask, F.normalize(mem.edit_keys.float(), dim=-1), mem.key_memory, k_mem)
    scores = torch.stack([activation_score(d, mask) for d in deltas])
    scores = torch.where(sims >= 0.9, scores, torch.zeros_like(scores))
    route = choose_memory(scores, mem.thresholds, sims)
    assert route.tolist() == [3, 7, NO_MEMORY, 7, NO_MEMORY]
    assert mem.last_route.tolist() == route.tolist()
    torch.testing.assert_close(mem.last_scores, scores)
    picked = torch.stack([deltas[r, i] if r >= 0 else torch.zeros(3, d_out) for i, r in enumerate(route.tolist())])
    torch.testing.assert_close(out, mem.base_layer(a) + picked)
    # a decode step keeps the prompt's route and still adds only that memory's output
    mem.begin_call(None, mask, decoding=True, cache=cache)
    step = torch.randn(5, 1, d_in)
    want = mem.base_layer(step) + torch.stack(
        [F.linear(step[i], mem.memories[r]) if r >= 0 else torch.zeros(1, d_out) for i, r in enumerate(route.tolist())])
    torch.testing.assert_close(mem(step), want)


def test_thousands_of_edits_route_as_if_every_key_were_compared(monkeypatch):
    """At T=10,000 comparing every prompt token with every key cost more than the model's own
    layers; the router then lets the subject gate say which memories are possible first.  On
    1,200 edits in 12 memories it routes and scores exactly as when every key is compared:
    an edited subject asked its own relation, the same subject asked another (shut by the
    answer gate, and once by the edit's other keys), an edit without a subject found by its
    key, and text naming nothing."""
    from conftest import make_tokenizer
    import wisecli.runtime.router as router_module
    tok = make_tokenizer()
    torch.manual_seed(0)
    k_mem, per, d_in, d_out = 12, 100, 16, 3
    n_edits = k_mem * per
    eye = torch.eye(d_in)
    answer_keys, edit_keys = torch.randn(n_edits, d_in), torch.randn(n_edits, d_in)
    answer_keys[0], answer_keys[150], edit_keys[700] = eye[0], eye[1], eye[2]
    subjects = [(e // per, f"name{e}") for e in range(n_edits)]
    subjects[0], subjects[150], subjects[700] = (0, "france"), (1, "spain"), (7, None)
    other_keys = torch.randn(n_edits, 4, d_in)
    other_keys[0, 2] = eye[0] + 0.5 * eye[4]  # another relation of france, near its answer key
    mem = SideMemoryLayer(torch.nn.Linear(d_in, d_out, bias=False), "linear", d_in, d_out, tokenizer=tok)
    mem.load_wise_state({**mem.wise_state(), "memories": torch.randn(k_mem, d_out, d_in),
                         "other_keys": other_keys.reshape(-1, d_in).half(),
                         "other_key_edit": torch.arange(n_edits).repeat_interleave(4),
                         "thresholds": torch.full((k_mem,), 0.01), "answer_keys": answer_keys.half(),
                         "answer_key_edit": torch.arange(n_edits), "edit_keys": edit_keys.half(),
                         "key_edit": torch.arange(n_edits), "key_memory": torch.arange(n_edits) // per},
                        subjects=subjects, targets=[(k, "x") for k, _ in subjects])
    mem.configure(RouterConfig(pooling="max", hold=True, key_gate=0.9, coverage_gate=0.6, subject_gate=True,
                               answer_gate=0.8))
    texts = ["the capital of france is", "the capital of spain is", "the capital of italy is", "who plays music",
             "the language of france is"]
    ids = tok(texts, return_tensors="pt", padding=True)
    a = eye[15].repeat(5, ids["input_ids"].shape[1], 1)  # off every planted key
    a[0, -1], a[1, -1], a[2, -2] = eye[0], eye[0], eye[2]  # france's relation twice; memory 7's key
    a[4, -1] = eye[0] + 0.45 * eye[4]  # within 0.8 of france's answer key, nearer its other key

    def routed() -> tuple[list[int], torch.Tensor]:
        mem.begin_call(ids["input_ids"], ids["attention_mask"], decoding=False)
        mem(a)
        return mem.last_route.tolist(), mem.last_scores.clone()
    narrowed, narrowed_scores = routed()
    monkeypatch.setattr(router_module, "SELECTIVE_KEYS", 10 ** 9)
    monkeypatch.setattr(router_module, "SELECTIVE_FROM", 10 ** 9)
    every, every_scores = routed()
    assert narrowed == every == [0, NO_MEMORY, 7, NO_MEMORY, NO_MEMORY]
    torch.testing.assert_close(narrowed_scores, every_scores)


class _Cache:
    """Stands in for transformers' cache object: the generation's identity."""


def test_an_unconfigured_layer_routes_by_scores_alone():
    """Before ``configure`` a layer is the paper's router: no gates, mean pooling."""
    assert PLAIN == RouterConfig(pooling="mean", hold=True, key_gate=0.0, coverage_gate=0.0, subject_gate=False)
    mem = SideMemoryLayer(torch.nn.Linear(4, 2, bias=False), "linear", 4, 2)
    assert mem.router.cfg == PLAIN
