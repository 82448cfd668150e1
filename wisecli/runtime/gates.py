"""The router's maths as plain tensor functions: top-1 choice among memories, and how a
prompt's tokens match the stored keys (key similarity, key coverage).

``router.Router`` decides with them; they hold no state and read nothing but their arguments.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .maths import scored_tokens

NO_MEMORY = -1  # route index meaning "main memory"


def choose_memory(scores: torch.Tensor, thresholds: torch.Tensor,
                  rank: torch.Tensor | None = None) -> torch.Tensor:
    """Top-1 routing: per example, the memory that clears its threshold by the widest factor.

    scores: (K, B); thresholds: (K,).  Returns (B,) long, NO_MEMORY where none clears.
    Compared by score / threshold, not raw score: each memory's scores live on their own
    scale, and the raw maximum sent edits to the wrong memory (ZsRE T=100 retrieve: rel 0.60).
    ``rank`` (K, B), when given, orders the memories that clear instead (key coverage).
    No ``.item()``: it batches and never stalls a GPU.
    """
    if scores.shape[0] == 0:
        return torch.full(scores.shape[1:], NO_MEMORY, dtype=torch.long, device=scores.device)
    above = scores > thresholds[:, None]
    if rank is None:
        rank = scores / thresholds.clamp_min(1e-6)[:, None]
    masked = torch.where(above, rank.to(scores.dtype), torch.full_like(scores, float("-inf")))
    best = masked.argmax(dim=0)
    return torch.where(above.any(dim=0), best, torch.full_like(best, NO_MEMORY))


def key_similarity(acts: torch.Tensor, token_mask: torch.Tensor | None, keys: torch.Tensor,
                   key_memory: torch.Tensor, n_memories: int) -> torch.Tensor:
    """Per memory, the best cosine between any scored token of a prompt and any of its keys.

    acts: (B, T, d_in) projected activations; keys: (M, d_in) unit-norm, projected alike;
    key_memory: (M,).  Returns (K, B), -1 for a memory with no key.  Unlike ‖D a‖ this does
    not grow as a merged memory takes in edits: a key is fixed when its edit is made.
    """
    return _per_memory(_best_token(acts, token_mask, keys), key_memory, n_memories)


def key_coverage(acts: torch.Tensor, token_mask: torch.Tensor | None, keys: torch.Tensor,
                 key_edit: torch.Tensor, key_memory: torch.Tensor, n_memories: int) -> torch.Tensor:
    """Per memory, the best over its edits of the mean over the edit's keys of each key's best
    cosine with a prompt token.  The single closest key is often a word another edit shares;
    a rephrase matches most of its own edit's keys.  Returns (K, B)."""
    return key_match(acts, token_mask, keys, key_memory, n_memories, edit_index(key_edit))[1]


def edit_index(key_edit: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Each key's edit renumbered 0..E-1, and E.  Worth caching: ``torch.unique`` syncs a GPU."""
    edits, owner = torch.unique(key_edit, return_inverse=True)
    return owner, edits.numel()


def key_match(acts: torch.Tensor, token_mask: torch.Tensor | None, keys: torch.Tensor,
              key_memory: torch.Tensor, n_memories: int,
              edit_owner: tuple[torch.Tensor, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``key_similarity`` and, given ``edit_owner``, ``key_coverage``, from one token-by-key
    product.  Without ``edit_owner`` the second tensor is the first."""
    best = _best_token(acts, token_mask, keys)  # (B, M)
    sims = _per_memory(best, key_memory, n_memories)
    if edit_owner is None:
        return sims, sims
    owner, n_edits = edit_owner
    index = owner[None].expand(best.shape[0], -1)
    per_edit = torch.zeros(best.shape[0], n_edits, device=best.device).scatter_reduce(
        1, index, best, reduce="mean", include_self=False)
    return sims, _per_memory(per_edit.gather(1, index), key_memory, n_memories)


def _best_token(acts: torch.Tensor, token_mask: torch.Tensor | None, keys: torch.Tensor) -> torch.Tensor:
    """(B, M): each key's best cosine with a scored token of each prompt."""
    sim = F.normalize(acts.float(), dim=-1) @ keys.float().T  # (B, T, M)
    m = scored_tokens(token_mask, sim[..., 0])
    return sim.masked_fill(m[..., None] == 0, -1.0).amax(dim=1)


def _per_memory(per_key: torch.Tensor, key_memory: torch.Tensor, n_memories: int) -> torch.Tensor:
    """(B, M) values per key -> (K, B), the largest over each memory's keys."""
    out = torch.full((n_memories, per_key.shape[0]), -1.0, device=per_key.device)
    index = key_memory[:, None].expand(-1, per_key.shape[0])
    return out.scatter_reduce(0, index, per_key.T, reduce="amax", include_self=True)


def route_names(route: torch.Tensor) -> list[str]:
    return ["main" if int(r) == NO_MEMORY else f"side[{int(r)}]" for r in route.tolist()]
