"""The WISE maths as pure functions: router score, margin loss, masks, TIES, replay, accuracy
(the router's own maths is tested in test_router.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wisecli.runtime.maths import (
    answer_match,
    fp8_keys,
    from_fp8_keys,
    last_token,
    counted_tokens,
    activation_score,
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
    torch.testing.assert_close(merge_ties([d1, d2]), d1 + d2)


def test_merge_ties_elects_sign_and_averages_agreeing_entries():
    d1 = torch.tensor([[3.0, -1.0, 2.0]])
    d2 = torch.tensor([[-1.0, -2.0, 2.0]])
    d3 = torch.tensor([[1.0, 4.0, 0.0]])
    merged = merge_ties([d1, d2, d3])
    # entry 0: sum +3 -> "+", mean of 3 and 1; entry 1: sum +1 -> "+", only 4;
    # entry 2: both nonzero agree, the zero of d3 does not dilute the mean
    assert merged.tolist() == [[2.0, 4.0, 2.0]]


def test_merge_ties_single_delta_is_identity():
    d = torch.randn(4, 4, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(merge_ties([d]), d)


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
    from wisecli.runtime.maths import common_basis, project_out, project_rows
    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(50, 32, generator=gen)
    basis = common_basis(acts, 4)
    assert torch.allclose(basis.T @ basis, torch.eye(4), atol=1e-5)  # orthonormal
    delta, a = torch.randn(8, 32, generator=gen), torch.randn(3, 32, generator=gen)
    torch.testing.assert_close(a @ project_rows(delta, basis).T, project_out(a, basis) @ delta.T)
    # the memory is silent on the directions it projects out
    assert (project_rows(delta, basis) @ basis).abs().max() < 1e-5


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


def test_float8_keys_keep_their_direction_over_any_scale():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(6, 300, generator=gen) * torch.tensor([1e-3, 0.1, 1.0, 30.0, 900.0, 2e4])[:, None]
    keys[2, 7] = 60.0  # an outlier dimension, as LLM activations have
    values, exponents = fp8_keys(keys)
    assert values.dtype == torch.float8_e4m3fn and exponents.dtype == torch.int16
    back = from_fp8_keys(values, exponents)
    assert (F.cosine_similarity(back, keys, dim=-1) > 0.999).all()
    assert ((back - keys).abs() <= keys.abs() / 16 + 1e-30 + 2.0 ** (exponents[:, None].float() - 9)).all()
    assert torch.equal(from_fp8_keys(*fp8_keys(back)), back)  # float8 values encode exactly


def test_last_token_is_the_last_real_one_on_either_padding_side():
    acts = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])  # right-padded, left-padded
    assert last_token(acts, mask)[:, 0].tolist() == [2.0, 7.0]
    assert last_token(acts, None)[:, 0].tolist() == [3.0, 7.0]


def test_answer_match_is_the_best_key_per_edit_and_minus_one_without_keys():
    keys = torch.eye(3)
    last = torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
    best = answer_match(last, keys, torch.tensor([0, 0, 1]), 3)
    assert torch.allclose(best, torch.tensor([[0.8, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
