"""The WISE maths, as pure functions over tensors.

Notation (paper, Sec. 3): ``W`` is the FFN output projection at layer L (main
memory), ``D = W' - W`` a side memory stored as a delta, ``a_t`` the input of the
projection at token t.  Nothing here touches a model, a file or a device choice.
The router's own maths (gates, top-1 choice) is in ``router.py``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def activation_score(delta_out: torch.Tensor, token_mask: torch.Tensor | None,
                     pooling: str = "mean") -> torch.Tensor:
    """Router score Δ(x): ‖D a_t‖₂ pooled over the prompt's tokens.

    delta_out: (B, T, d_out) = D a_t for each token; token_mask: (B, T), 1 for the
    tokens that count (the prompt; never padding).  Returns (B,).  ``mean`` is the
    paper's; ``max`` is not diluted by a long context before the question, nor by
    template words every prompt of a relation shares.
    """
    return pool_scores(*token_scores(delta_out, token_mask), pooling)


def token_scores(delta_out: torch.Tensor, token_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ‖D a_t‖₂ (zero where a token does not count) and the (B, T) weights."""
    norms = delta_out.float().norm(dim=-1)  # (B, T)
    m = scored_tokens(token_mask, norms)
    return norms * m, m


def pool_scores(norms: torch.Tensor, m: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "max":
        return norms.amax(dim=-1)
    return norms.sum(-1) / m.sum(-1).clamp_min(1.0)


def scored_tokens(token_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The tokens a score averages over: real tokens except each row's first one.

    The first position of a sequence carries the model's "attention sink", whose
    activations are orders of magnitude larger than any other token's and nearly
    the same for every prompt; counted, it would drown what tells prompts apart.
    """
    m = torch.ones_like(like) if token_mask is None else token_mask.to(like.dtype)
    first = (m.cumsum(-1) == 1) & (m > 0)
    drop = first & (m.sum(-1, keepdim=True) > 1)
    return m.masked_fill(drop, 0.0)


def project_out(acts: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """a − U Uᵀ a: drop the directions that irrelevant text's activations share.

    FFN activations of any two tokens share a large common part; a side memory
    trained on edits answers that part too, so every prompt would score as an edit.
    Reading only what lies outside the irrelevant text's top singular directions
    (the null-space idea of AlphaEdit, applied to the router) leaves the memory
    silent on ordinary text and keeps the subject-specific part of an edit prompt.
    """
    if basis.shape[-1] == 0:
        return acts
    return acts - (acts @ basis) @ basis.T


def project_rows(delta: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """D (I − U Uᵀ): a memory that reads project_out(a) for the price of reading a.

    Stored memories are kept in this form, so inference pays no projection.
    """
    if basis.shape[-1] == 0:
        return delta
    return delta - (delta @ basis) @ basis.T


FP8_MAX = 448.0  # the largest float8_e4m3fn value


def fp8_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Router keys (M, d_in) as float8 values and a power of two per key (M,) int16.

    A key is read by its direction (the key gate's cosine) and, once per merge, by the
    memory's score on it: float8's 3-bit mantissa moves a key's cosine with itself by under
    0.001, and halves what a 7B model's keys cost per edit (4 × 11008 values)."""
    top = keys.float().abs().amax(-1).clamp_min(1e-30)
    exp = torch.ceil(torch.log2(top / FP8_MAX)).clamp(-120, 120)
    return (keys.float() * torch.exp2(-exp)[:, None]).to(torch.float8_e4m3fn), exp.to(torch.int16)


def from_fp8_keys(values: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """The keys ``fp8_keys`` encoded, float32."""
    return values.float() * torch.exp2(exponents.float())[:, None]


def last_token(acts: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, d) -> (B, d): each row's last real token, the position whose output predicts
    the answer (padding on either side; a teacher-forced answer is outside the mask)."""
    if token_mask is None:
        return acts[:, -1]
    m = token_mask[:, -acts.shape[1]:].to(torch.long)
    pos = (m * torch.arange(1, m.shape[1] + 1, device=m.device)).argmax(-1)
    return acts[torch.arange(acts.shape[0], device=acts.device), pos]


def answer_match(last: torch.Tensor, keys: torch.Tensor, key_edit: torch.Tensor, n_edits: int) -> torch.Tensor:
    """(E, B): per edit, the best cosine between a row's answer position and the edit's answer
    keys, both unit-norm; -1 for an edit without one.  last: (B, d); keys: (A, d); key_edit: (A,)."""
    sims = keys.float() @ last.float().T  # (A, B)
    out = torch.full((n_edits, last.shape[0]), -1.0, device=last.device)
    return out.scatter_reduce(0, key_edit[:, None].expand_as(sims), sims, reduce="amax", include_self=True)


def common_basis(acts: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` right singular vectors of (N, d_in) activations, as a (d_in, r) basis."""
    rank = min(rank, acts.shape[0], acts.shape[1])
    if rank == 0:
        return acts.new_zeros(acts.shape[1], 0)
    _, _, vh = torch.linalg.svd(acts.float(), full_matrices=False)
    return vh[:rank].T.contiguous()


def loudest_tokens(acts: torch.Tensor, token_mask: torch.Tensor, delta: torch.Tensor,
                   k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``k`` tokens with the largest ‖D a_t‖: the ones a max-pooled router keys on.

    acts: (B, T, d_in), token_mask: (B, T).  Returns their activations (B, k, d_in) and
    a (B, k) bool telling real tokens from filler where a prompt has fewer than ``k``.
    """
    norms, m = token_scores(F.linear(acts.float(), delta), token_mask)
    return _top_tokens(acts, norms.masked_fill(m == 0, -1.0), k)


def _top_tokens(acts: torch.Tensor, rank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``k`` highest-ranked tokens (B, k, d_in), and which are real (rank >= 0)."""
    top = rank.topk(min(k, acts.shape[1]), dim=-1)
    picked = torch.gather(acts, 1, top.indices[..., None].expand(-1, -1, acts.shape[-1]))
    return picked, top.values >= 0


def distinct_tokens(acts: torch.Tensor, token_mask: torch.Tensor, delta: torch.Tensor, k: int,
                    reference: torch.Tensor, basis: torch.Tensor,
                    cutoff: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Like ``loudest_tokens``, but only among tokens no ``reference`` token matches.

    A key is there to let the edit's own prompts through the key gate and keep others
    out; a template word ("The chemical symbol for ...") whose activation some other
    prompt matches at cosine >= ``cutoff`` (the gate) lets that prompt through too.
    ``reference``: (N, d_in) activations of text that must stay out (the edits' near
    misses, the irrelevant prompts).  A prompt with fewer than ``k`` distinct tokens keeps
    fewer keys, and at least its least-matched token, so every edit stays reachable.
    """
    norms, m = token_scores(F.linear(acts.float(), delta), token_mask)
    unit = F.normalize(project_out(acts.float(), basis), dim=-1)
    ref = F.normalize(project_out(reference.float(), basis), dim=-1)
    common = torch.stack([(row @ ref.T).amax(-1) for row in unit])  # (B, T), row by row: memory
    common = common.masked_fill(m == 0, float("inf"))
    distinct = common < cutoff
    distinct |= (common == common.amin(-1, keepdim=True)) & (m > 0)
    return _top_tokens(acts, norms.masked_fill(~distinct, -1.0), k)


def min_edit_score(keys: torch.Tensor, key_edit: torch.Tensor, delta: torch.Tensor,
                   scale: torch.Tensor, pooling: str = "max") -> torch.Tensor:
    """The lowest router score among the edits whose keys these are, under memory ``delta``.

    An edit's score is the max over its keys (max pooling over its loudest tokens); under
    mean pooling the mean of its keys stands in for the prompt's mean.  Returns a 0-d tensor.
    """
    norms = F.linear(keys.float(), delta).norm(dim=-1) / scale  # (M,)
    edits, owner = torch.unique(key_edit, return_inverse=True)
    reduce = "amax" if pooling == "max" else "mean"
    per_edit = torch.zeros(edits.numel(), device=norms.device).scatter_reduce(
        0, owner, norms, reduce=reduce, include_self=False)
    return per_edit.min()


def counted_tokens(acts: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """(N, d_in): the tokens of (B, T, d_in) activations that a score counts (``scored_tokens``)."""
    return acts[scored_tokens(token_mask, acts[..., 0]) > 0]


def replay_factor(factor: torch.Tensor, count: float, new: torch.Tensor,
                  rank: int) -> tuple[torch.Tensor, float]:
    """F (d_in, r) with F Fᵀ = the mean a aᵀ over earlier and new tokens, best rank r.

    factor/count: the factor so far and how many tokens it stands for; new (n, d_in): the
    new tokens.  Exact while ``rank`` >= d_in.  A factor, not the d_in × d_in moment: for a
    7B model's d_in = 11008 the moment is 485 MB and its product with ΔD a teraflop per
    step; rank 2048 keeps it to 90 MB and a fifth of that.
    """
    total = count + new.shape[0]
    rows = [new.float()] if not factor.numel() else [factor.T.float() * count ** 0.5, new.float()]
    g = torch.cat(rows) / max(total, 1.0) ** 0.5  # (m, d_in): the moment is gᵀ g
    r = min(rank, g.shape[0], g.shape[1])
    if g.shape[0] > g.shape[1]:
        return moment_factor(g.T @ g, r), float(total)
    _, sv, vh = torch.linalg.svd(g, full_matrices=False)
    return vh[:r].T * sv[:r], float(total)


def moment_factor(moment: torch.Tensor, rank: int) -> torch.Tensor:
    """F (d, r) with F Fᵀ the best rank-r approximation of a symmetric PSD (d, d) matrix."""
    vals, vecs = torch.linalg.eigh(moment.float())  # ascending
    vals, vecs = vals.flip(0)[:rank], vecs.flip(1)[:, :rank]
    return vecs * vals.clamp_min(0).sqrt()


def replay_penalty(change: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """mean ‖ΔD a‖² over earlier edits' tokens = ‖ΔD F‖², F Fᵀ their mean a aᵀ.

    The memory's output on what earlier edits read is what holds them; keeping it
    while new edits train stops a shared (merged) memory from overwriting the oldest
    edits (ZsRE T=100: reliability of the first 20 edits 0.78, of the last 40 1.00).
    A fixed-size factor holds every earlier token, whatever their number.
    """
    return (change @ factor).pow(2).sum()


def margin_loss(edit_scores: torch.Tensor, irr_tokens: torch.Tensor, irr_mask: torch.Tensor,
                alpha: float, beta: float, gamma: float, pooling: str = "max") -> torch.Tensor:
    """Eq. (4) of the paper: push irrelevant scores under α, edit scores over β,
    and every (edit, irrelevant) pair at least γ apart.  Pairwise, so one outlier
    negative cannot hide behind the batch mean.

    The α term is applied to every token of an irrelevant prompt, not to its pooled
    score: under max pooling a pooled hinge only ever pushes the one loudest token
    down, the next-loudest rises in its place, and unseen text keeps scoring high.
    irr_tokens / irr_mask: (N, T) per-token scores and weights (``token_scores``).
    """
    loss = F.relu(beta - edit_scores).mean()
    if irr_tokens.numel():
        irr_scores = pool_scores(irr_tokens, irr_mask, pooling)
        loss = loss + (F.relu(irr_tokens - alpha) * irr_mask).sum() / irr_mask.sum().clamp_min(1)
        gap = edit_scores[:, None] - irr_scores[None, :]
        loss = loss + F.relu(gamma - gap).mean()
    return loss


def shard_mask(shape: torch.Size | tuple[int, ...], ratio: float, seed: int,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Random gradient mask of one knowledge shard (density ``ratio``), as booleans.

    Drawn from its own seeded generator on the CPU so that the same (seed, shard)
    gives the same mask on every machine; masks are therefore never stored.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return (torch.rand(tuple(shape), generator=gen) < ratio).to(device)


_PRIME = 2_147_483_647  # 2^31 - 1: every product below stays inside int64


def shard_signs(rank: int, d_in: int, seed: int) -> torch.Tensor:
    """(rank, d_in) random ±1 directions, from integer hashing of (seed, index) rather than a
    library generator: a checkpoint stores a shard's seed, and any machine and torch version
    rebuilds the same directions from it."""
    idx = torch.arange(rank * d_in, dtype=torch.int64)
    x = (idx * 48_271 + (int(seed) % _PRIME) * 69_621 + 1) % _PRIME
    for mult in (48_271, 69_621, 16_807):
        x = (x ^ (x >> 11)) % _PRIME
        x = (x * mult + 12_345) % _PRIME
    return (((x >> 15) & 1).float() * 2 - 1).view(rank, d_in)


def shard_subspace(rank: int, d_in: int, seed: int, ratio: float) -> torch.Tensor:
    """(rank, d_in) input directions one knowledge shard writes through: τ·A with A fixed can
    change the memory only along ``rank`` random directions, as a gradient mask lets it change
    only some entries.  Scaled so that one step moves the shard's own activations as far as a
    ``ratio`` mask would (E[AᵀA] = ratio·I)."""
    return shard_signs(rank, d_in, seed) * math.sqrt(ratio / rank)


def subspace_memory(factors: torch.Tensor, seeds: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Σ_s F_s S_s (I − U Uᵀ): a memory made of subspace shards, from their stored factors
    F_s (d_out, r) (τ_s scaled into them) and seeds; float32, held in float16 values."""
    d_out, rank = factors.shape[1], factors.shape[2]
    d_in = basis.shape[0]
    signs = torch.cat([shard_signs(rank, d_in, int(s)) for s in seeds.tolist()]).to(factors.device)
    memory = factors.float().permute(1, 0, 2).reshape(d_out, -1) @ project_out(signs, basis)
    return memory.half().float()


def merge_ties(deltas: list[torch.Tensor]) -> torch.Tensor:
    """TIES merge (Yadav et al. 2023) of shard deltas τ_i that share one starting point.

    1. elect: per entry, the sign of the summed deltas;
    2. disjoint mean: average only the entries that agree with the elected sign.
    Entries touched by one shard only (disjoint masks) come through unchanged.  TIES's
    first step, trimming each τ_i to its largest entries, is left out: a shard trained
    alone under its own mask only loses edits by it.
    """
    stacked = torch.stack(deltas)  # (n, d_out, d_in)
    sign = torch.sign(stacked.sum(dim=0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    total = (stacked * agree).sum(dim=0)
    count = agree.sum(dim=0).clamp_min(1)
    return total / count


def target_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced accuracy of the labelled tokens, per row.

    logits: (B, T, V) predicting position t+1 from t; labels: (B, T) with -100 where
    nothing is scored.  Returns (per-row share of correct tokens, per-row all-correct).
    """
    pred = logits[:, :-1].argmax(-1)
    gold = labels[:, 1:]
    scored = gold != -100
    correct = (pred == gold) & scored
    n = scored.sum(-1)
    share = correct.sum(-1).float() / n.clamp_min(1).float()
    return share, (correct.sum(-1) == n) & (n > 0)


def target_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row mean cross-entropy of the labelled tokens (0 for rows without labels)."""
    lp = logits[:, :-1].float()
    gold = labels[:, 1:]
    nll = F.cross_entropy(lp.reshape(-1, lp.shape[-1]), gold.reshape(-1),
                          ignore_index=-100, reduction="none").view(gold.shape)
    n = (gold != -100).sum(-1).clamp_min(1)
    return nll.sum(-1) / n
