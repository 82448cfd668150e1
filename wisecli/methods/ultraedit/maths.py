"""UltraEdit's algebra as plain tensor functions (float32 throughout)."""
from __future__ import annotations

import torch

EPS = 1e-6


def merge_moments(mean: torch.Tensor, var: torch.Tensor, count: float,
                  x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Running per-feature mean and (population) variance after the rows of ``x`` (N, D):
    the pairwise combination of Chan et al., so turns of any size merge exactly as if
    every row had been seen at once."""
    n = x.shape[0]
    if n == 0:
        return mean, var, count
    x = x.float()
    batch_mean, batch_var = x.mean(0), x.var(0, unbiased=False)
    total = count + n
    delta = batch_mean - mean
    new_mean = mean + delta * (n / total)
    m2 = var * count + batch_var * n + delta.square() * (count * n / total)
    return new_mean, m2 / total, total


def normalise(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return (x.float() - mean) / torch.sqrt(var + EPS)


def weight_shift(keys: torch.Tensor, grads: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                 learning_rate: float, ridge: float, kept: torch.Tensor | None = None) -> torch.Tensor:
    """The (d_out, d_in) shift of a linear layer's weight for one turn.

    ``keys`` (N, d_in) are the layer's inputs at the answer positions and ``grads`` (N, d_out)
    the loss gradient at its outputs there.  Normalised jointly with the running statistics
    (``mean``/``var`` over the d_in + d_out features), each row's wanted output shift is the
    normalised gradient scaled by -lr·‖k̂‖²; the weight shift is the ridge solution of
    K ΔWᵀ ≈ V on the raw keys, so directions the keys never visit are left alone.

    ``kept`` (d_in, d_in), when given, is added to the normal matrix: the weighted second
    moment of keys whose outputs should not move (text unrelated to the edits), so that the
    shift answers the edits' keys without moving outputs where ordinary text's keys lie (the
    preservation term of MEMIT and AlphaEdit)."""
    keys, grads = keys.float(), grads.float()
    z = normalise(torch.cat([keys, grads], dim=-1), mean, var)
    k_hat, g_hat = z.split([keys.shape[1], grads.shape[1]], dim=-1)
    values = -learning_rate * k_hat.square().sum(-1, keepdim=True) * g_hat
    gram = keys.T @ keys + ridge * torch.eye(keys.shape[1], device=keys.device)
    if kept is not None:
        gram = gram + kept.to(gram.device)
    return torch.linalg.solve(gram, keys.T @ values).T


def second_moment(keys: torch.Tensor) -> torch.Tensor:
    """(d, d) mean of k kᵀ over the rows of ``keys`` (N, d), in float32."""
    keys = keys.float()
    return keys.T @ keys / max(keys.shape[0], 1)
