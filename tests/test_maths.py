"""The WISE maths as pure functions: router score, routing, margin loss, masks, TIES, accuracy."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wisecli.wise.maths import (
    counted_tokens,
    NO_MEMORY,
    activation_score,
    choose_memory,
    key_coverage,
    key_similarity,
    margin_loss,
    merge_ties,
    replay_factor,
    replay_penalty,
    scored_tokens,
    shard_mask,
    target_accuracy,
    target_nll,
)

# ---- activation_score / scored_tokens ------------------------------------------------


def test_activation_score_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    delta_out = torch.randn(3, 5, 4, generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1],     # left padding: positions 3, 4 count (2 is first)
                         [1, 1, 1, 1, 1],     # no padding: 1..4 count
                         [0, 0, 0, 0, 1]])    # one real token: it is all there is, so it counts
    norms = delta_out.norm(dim=-1)
    want = torch.stack([norms[0, 3:].mean(), norms[1, 1:].mean(), norms[2, 4]])
    torch.testing.assert_close(activation_score(delta_out, mask), want)


def test_activation_score_ignores_padding_and_first_token_values():
    """Whatever sits at the padding and the first real token cannot move the score."""
    g = torch.Generator().manual_seed(1)
    delta_out = torch.randn(2, 6, 8, generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    before = activation_score(delta_out, mask)
    noisy = delta_out.clone()
    noisy[0, :3] *= 1000.0   # two pads and the first real token of row 0
    noisy[1, 0] *= 1000.0    # the first token (attention sink) of row 1
    torch.testing.assert_close(activation_score(noisy, mask), before)


def test_activation_score_without_mask_drops_only_first_token():
    delta_out = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    norms = delta_out.norm(dim=-1)
    torch.testing.assert_close(activation_score(delta_out, None), norms[:, 1:].mean(-1))


def test_scored_tokens_mask():
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    got = scored_tokens(mask, torch.zeros(3, 4))
    assert got.tolist() == [[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]


def test_activation_score_all_padding_row_is_zero_not_nan():
    score = activation_score(torch.ones(1, 3, 2), torch.zeros(1, 3, dtype=torch.long))
    assert score.tolist() == [0.0]


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


# ---- margin_loss -------------------------------------------------------------------

ALPHA, BETA, GAMMA = 0.05, 0.5, 0.3


def ml(edit: torch.Tensor, irr: torch.Tensor, alpha=ALPHA, beta=BETA, gamma=GAMMA) -> torch.Tensor:
    """margin_loss with one scored token per irrelevant prompt (pooled score = token score)."""
    irr = torch.as_tensor(irr)
    return margin_loss(torch.as_tensor(edit), irr[:, None], torch.ones(irr.shape[0], 1),
                       alpha, beta, gamma)


def test_margin_loss_zero_when_separated():
    edit = torch.tensor([0.6, 0.9])
    irr = torch.tensor([0.0, 0.04, 0.01])
    assert ml(edit, irr).item() == 0.0


@pytest.mark.parametrize("edit, irr", [
    ([0.4, 0.9], [0.0]),          # an edit below beta
    ([0.6, 0.9], [0.1]),          # an irrelevant prompt above alpha
    ([0.6, 0.9], [0.04, 0.35]),   # above alpha and the gap 0.6 - 0.35 < gamma
])
def test_margin_loss_positive_when_a_margin_is_violated(edit, irr):
    assert ml(torch.tensor(edit), torch.tensor(irr)).item() > 0


def test_margin_loss_gap_term_alone():
    """Both scores inside their own margins but too close: only the gap term fires."""
    loss = ml(torch.tensor([0.5]), torch.tensor([0.3]), 0.3, 0.5, 0.3)
    assert loss.item() == pytest.approx(0.1)


def test_margin_loss_without_irrelevant_scores():
    loss = ml(torch.tensor([0.2, 0.7]), torch.zeros(0))
    assert loss.item() == pytest.approx(0.15)


def test_margin_loss_gradient_pushes_edit_scores_up_and_irrelevant_down():
    edit = torch.tensor([0.1, 0.2], requires_grad=True)
    irr = torch.tensor([0.2, 0.3], requires_grad=True)
    ml(edit, irr).backward()
    assert (edit.grad < 0).all()   # descent raises edit scores
    assert (irr.grad > 0).all()    # and lowers irrelevant ones
    # one step of descent lowers the loss
    with torch.no_grad():
        e2, i2 = edit - 0.1 * edit.grad, irr - 0.1 * irr.grad
    assert ml(e2, i2) < ml(edit.detach(), irr.detach())


def test_margin_loss_pushes_every_loud_token_of_an_irrelevant_prompt():
    """Not just the loudest one: under max pooling the next token would take its place.
    Unscored tokens (weight 0: padding, the first token) get no gradient."""
    edit = torch.tensor([0.9])
    tokens = torch.tensor([[0.4, 0.3, 0.01, 0.8]], requires_grad=True)
    weights = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    margin_loss(edit, tokens * weights, weights, ALPHA, BETA, GAMMA).backward()
    g = tokens.grad[0]
    assert g[0] > 0 and g[1] > 0      # both tokens above alpha are pushed down
    assert g[2] == 0 and g[3] == 0    # below alpha: nothing; not scored: nothing


# ---- shard_mask --------------------------------------------------------------------


def test_shard_mask_density_and_dtype():
    m = shard_mask((200, 300), 0.2, seed=7)
    assert m.dtype == torch.bool and m.shape == (200, 300)
    assert m.float().mean().item() == pytest.approx(0.2, abs=0.01)
    assert shard_mask((200, 300), 1.0, seed=7).all()


def test_shard_mask_seeded():
    a = shard_mask(torch.Size([64, 128]), 0.3, seed=3)
    assert torch.equal(a, shard_mask((64, 128), 0.3, seed=3))
    b = shard_mask((64, 128), 0.3, seed=4)
    assert not torch.equal(a, b)
    # independent of the global RNG
    torch.manual_seed(123)
    assert torch.equal(a, shard_mask((64, 128), 0.3, seed=3))


# ---- merge_ties --------------------------------------------------------------------


def test_merge_ties_disjoint_deltas_come_through_unchanged():
    g = torch.Generator().manual_seed(0)
    m1 = shard_mask((8, 16), 0.3, seed=1)
    m2 = shard_mask((8, 16), 0.3, seed=2) & ~m1
    d1 = torch.randn(8, 16, generator=g) * m1
    d2 = torch.randn(8, 16, generator=g) * m2
    torch.testing.assert_close(merge_ties([d1, d2], 1.0), d1 + d2)


def test_merge_ties_elects_sign_and_averages_agreeing_entries():
    d1 = torch.tensor([[3.0, -1.0, 2.0]])
    d2 = torch.tensor([[-1.0, -2.0, 2.0]])
    d3 = torch.tensor([[1.0, 4.0, 0.0]])
    merged = merge_ties([d1, d2, d3], 1.0)
    # entry 0: sum +3 -> "+", mean of 3 and 1; entry 1: sum +1 -> "+", only 4;
    # entry 2: both nonzero agree, the zero of d3 does not dilute the mean
    assert merged.tolist() == [[2.0, 4.0, 2.0]]


def test_merge_ties_density_keeps_top_entries():
    d = torch.tensor([[1.0, -4.0, 2.0, -3.0]])
    assert merge_ties([d], 0.5).tolist() == [[0.0, -4.0, 0.0, -3.0]]
    assert merge_ties([d], 0.25).tolist() == [[0.0, -4.0, 0.0, 0.0]]
    # density counts the nonzero entries: a sparse (masked) delta keeps its own top share
    sparse = torch.tensor([[0.0, 5.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]])
    assert merge_ties([sparse], 0.5).tolist() == [[0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]


def test_merge_ties_trims_before_electing():
    """A small entry trimmed from one shard no longer votes against another's sign."""
    d1 = torch.tensor([[10.0, -2.0]])
    d2 = torch.tensor([[0.0, 1.0]])
    assert merge_ties([d1, d2], 1.0).tolist() == [[10.0, -2.0]]  # untrimmed, "-" wins entry 1
    assert merge_ties([d1, d2], 0.5).tolist() == [[10.0, 1.0]]


def test_merge_ties_single_delta_is_identity():
    d = torch.randn(4, 4, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(merge_ties([d], 1.0), d)


# ---- target_accuracy / target_nll --------------------------------------------------


def _onehot_logits(pred: list[list[int]], vocab: int = 5) -> torch.Tensor:
    return F.one_hot(torch.tensor(pred), vocab).float() * 10.0


def test_target_accuracy_per_row():
    # logits at t predict token t+1; labels -100 except the answer positions
    logits = _onehot_logits([[0, 3, 4, 0], [0, 3, 1, 0], [0, 0, 0, 0]])
    labels = torch.tensor([[-100, -100, 3, 4], [-100, -100, 3, 4], [-100, -100, -100, -100]])
    share, all_ok = target_accuracy(logits, labels)
    assert share.tolist() == [1.0, 0.5, 0.0]
    assert all_ok.tolist() == [True, False, False]


def test_target_nll_per_row():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, generator=g)
    labels = torch.tensor([[-100, -100, 3, 4], [-100, -100, -100, -100]])
    want = F.cross_entropy(logits[0, 1:3], torch.tensor([3, 4]))
    nll = target_nll(logits, labels)
    torch.testing.assert_close(nll[0], want)
    assert nll[1].item() == 0.0


def test_projected_memory_reads_projected_activations():
    from wisecli.wise.maths import common_basis, project_out, project_rows
    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(50, 32, generator=gen)
    basis = common_basis(acts, 4)
    assert torch.allclose(basis.T @ basis, torch.eye(4), atol=1e-5)  # orthonormal
    delta, a = torch.randn(8, 32, generator=gen), torch.randn(3, 32, generator=gen)
    torch.testing.assert_close(a @ project_rows(delta, basis).T, project_out(a, basis) @ delta.T)
    # the memory is silent on the directions it projects out
    assert (project_rows(delta, basis) @ basis).abs().max() < 1e-5


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


@pytest.mark.parametrize("route_by,want", [("closest", 1), ("coverage", 0)])
def test_layer_picks_the_memory_by_route_by(route_by, want):
    """The memories and prompt above, in the layer: both pass; ``route_by`` alone decides."""
    from wisecli.wise.memory import SideMemoryLayer
    eye = torch.eye(5)
    mem = SideMemoryLayer(torch.nn.Linear(5, 3, bias=False), "linear", 5, 3)
    mem.memories = torch.ones(2, 3, 5)
    mem.thresholds = torch.tensor([0.1, 0.1])
    mem.edit_keys = eye.half()
    mem.key_edit, mem.key_memory = torch.tensor([0, 0, 0, 1, 1]), torch.tensor([0, 0, 0, 1, 1])
    mem.key_gate, mem.route_by = 0.9, route_by
    mem(torch.stack([7 * eye[4], eye[0] + 0.3 * eye[2], eye[1] + 0.3 * eye[2], eye[3]])[None])
    assert mem.last_route.tolist() == [want]


def test_coverage_gate_shuts_a_memory_matched_on_one_key_only():
    """One edit keyed on axes 0, 1, 2.  A near miss shares one of its words exactly (axis 0,
    the template); the edit's own rephrase is close to all three.  The key gate passes both;
    a coverage gate of 0.6 passes only the rephrase."""
    from wisecli.wise.memory import SideMemoryLayer
    eye = torch.eye(5)
    mem = SideMemoryLayer(torch.nn.Linear(5, 3, bias=False), "linear", 5, 3)
    mem.memories = torch.ones(1, 3, 5)
    mem.thresholds = torch.tensor([0.1])
    mem.edit_keys = eye[:3].half()
    mem.key_edit, mem.key_memory = torch.tensor([0, 0, 0]), torch.tensor([0, 0, 0])
    sink = 7 * eye[4]
    near_miss = torch.stack([sink, eye[0], eye[3], eye[3] + 0.1 * eye[4]])
    rephrase = torch.stack([sink, eye[0] + 0.2 * eye[3], eye[1] + 0.2 * eye[3], eye[2] + 0.2 * eye[4]])
    a = torch.stack([near_miss, rephrase])
    mem.key_gate = 0.9
    mem(a)
    assert mem.last_route.tolist() == [0, 0]
    mem.coverage_gate = 0.6
    mem(a)
    assert mem.last_route.tolist() == [NO_MEMORY, 0]


def test_key_gate_keeps_memory_off_prompts_unlike_its_keys():
    from wisecli.wise.memory import SideMemoryLayer
    base = torch.nn.Linear(4, 2, bias=False)
    mem = SideMemoryLayer(base, "linear", 4, 2)
    mem.memories = torch.ones(1, 2, 4)
    mem.thresholds = torch.tensor([0.5])
    mem.edit_keys = torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float16)
    mem.key_edit, mem.key_memory = torch.tensor([0]), torch.tensor([0])
    a = torch.tensor([[[0, 0, 0, 1.0], [3.0, 0, 0, 0]],   # second token is the key: routed
                      [[0, 0, 0, 1.0], [0, 3.0, 0, 0]]])  # orthogonal to it: gated off
    mem.forward(a)
    assert mem.last_route.tolist() == [0, 0]  # no gate: the score alone routes both
    mem.key_gate = 0.9
    mem.forward(a)
    assert mem.last_route.tolist() == [0, NO_MEMORY]


def test_many_memories_computed_only_where_routable_give_the_same_outputs():
    """Retrieve mode with many memories skips D_k a for gated-off memories; nothing may change."""
    from wisecli.wise.memory import SideMemoryLayer
    torch.manual_seed(0)
    k_mem, d_in, d_out = 12, 16, 6
    mem = SideMemoryLayer(torch.nn.Linear(d_in, d_out, bias=False), "linear", d_in, d_out)
    assert k_mem >= mem.SELECTIVE_FROM
    mem.memories = torch.randn(k_mem, d_out, d_in)
    mem.thresholds = torch.full((k_mem,), 0.5)
    keys = torch.randn(k_mem, d_in)
    mem.edit_keys, mem.key_edit, mem.key_memory = keys.half(), torch.arange(k_mem), torch.arange(k_mem)
    mem.key_gate = 0.9
    a = torch.randn(5, 3, d_in)
    a[0, 2], a[1, 1], a[3, 2] = 4 * keys[3], 2 * keys[7], 3 * keys[7]  # rows 2 and 4: no key
    mask = torch.ones(5, 3)
    mem.token_mask = mask
    out = mem(a)
    # the reference: every memory's output and score, the gate, then top-1 routing
    deltas = torch.stack([F.linear(a, mem.memories[k]) for k in range(k_mem)])
    sims = key_similarity(a, mask, mem.unit_keys(), mem.key_memory, k_mem)
    scores = torch.stack([activation_score(d, mask) for d in deltas])
    scores = torch.where(sims >= 0.9, scores, torch.zeros_like(scores))
    route = choose_memory(scores, mem.thresholds, sims)
    assert route.tolist() == [3, 7, NO_MEMORY, 7, NO_MEMORY]
    assert mem.last_route.tolist() == route.tolist()
    torch.testing.assert_close(mem.last_scores, scores)
    picked = torch.stack([deltas[r, i] if r >= 0 else torch.zeros(3, d_out) for i, r in enumerate(route.tolist())])
    torch.testing.assert_close(out, mem.base_layer(a) + picked)
    # a decode step keeps the prompt's route and still adds only that memory's output
    mem.decoding, step = True, torch.randn(5, 1, d_in)
    want = mem.base_layer(step) + torch.stack(
        [F.linear(step[i], mem.memories[r]) if r >= 0 else torch.zeros(1, d_out) for i, r in enumerate(route.tolist())])
    torch.testing.assert_close(mem(step), want)


def test_replay_penalty_is_mean_squared_output_change_on_earlier_tokens():
    torch.manual_seed(0)
    acts = torch.randn(2, 4, 5)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])  # left padding; first real token dropped
    kept = torch.cat([acts[0, 2:], acts[1, 1:]])
    torch.testing.assert_close(counted_tokens(acts, mask), kept)
    # folded in two parts, the factor still gives the mean over all five tokens
    factor, n = replay_factor(torch.zeros(0, 0), 0.0, kept[:2], rank=16)
    factor, n = replay_factor(factor, n, kept[2:], rank=16)
    assert n == 5
    torch.testing.assert_close(factor @ factor.T, kept.T @ kept / 5)
    change = torch.randn(3, 5)
    want = (kept @ change.T).pow(2).sum(-1).mean()
    torch.testing.assert_close(replay_penalty(change, factor), want)


def test_replay_factor_keeps_the_largest_directions_at_low_rank():
    torch.manual_seed(0)
    big = torch.randn(200, 1) @ torch.randn(1, 8) * 10  # one dominant direction
    tokens = big + 0.01 * torch.randn(200, 8)
    factor, _ = replay_factor(torch.zeros(0, 0), 0.0, tokens, rank=1)
    assert factor.shape == (8, 1)
    moment = tokens.T @ tokens / 200
    assert (factor @ factor.T - moment).norm() / moment.norm() < 1e-3