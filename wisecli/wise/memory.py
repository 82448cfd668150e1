"""The side-memory layer: main memory W, side memories D_k, and the router, in one module.

It replaces the FFN output projection in the model (peft-style: it keeps
``base_layer`` and adds its own state beside it).  All state is in registered
buffers, so ``wise_state()`` is exactly what is saved — no Python lists of
tensors, no pickle.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .maths import (NO_MEMORY, activation_score, choose_memory, edit_index, key_match, moment_factor,
                    pool_scores, project_out, token_scores)
from .subjects import prompt_texts, subject_open


class SideMemoryLayer(nn.Module):
    """``y = W a`` (main memory) or ``y = W a + D_k a`` (side memory k), chosen per example.

    Side memories are deltas ``D_k = W'_k - W`` in float32: the router score is
    ``‖D_k a‖`` anyway, so storing the delta costs one matmul instead of two, and
    keeps the optimiser's precision when the base runs in bf16.
    """

    def __init__(self, base_layer: nn.Module, kind: str, in_features: int, out_features: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.kind = kind
        self.in_features, self.out_features = in_features, out_features
        dev = next(base_layer.parameters()).device
        self.register_buffer("memories", torch.zeros(0, out_features, in_features, device=dev))
        self.register_buffer("thresholds", torch.zeros(0, device=dev))
        # Per memory: the smallest score seen on its edited prompts; threshold = act_ratio × this.
        self.register_buffer("min_edit_scores", torch.zeros(0, device=dev))
        # Typical ‖W a_t‖ at this layer: the unit of all router scores and margins.
        self.register_buffer("scale", torch.ones((), device=dev))
        # (d_in, r) orthonormal basis of what irrelevant text's activations share; side
        # memories read only the part of a_t outside it (see maths.project_out).
        self.register_buffer("basis", torch.zeros(in_features, 0, device=dev))
        # Router keys: a few activations of each edit's prompt (its loudest tokens), so a
        # threshold can be re-measured whenever a merge changes the memory: in merge mode
        # every new shard raises all scores, and a threshold fixed at the first merge lets
        # everything through by the hundredth edit.  key_edit: the edit each key belongs
        # to (running count); key_memory: the side memory that holds it.
        self.register_buffer("edit_keys", torch.zeros(0, in_features, dtype=torch.float16, device=dev))
        self.register_buffer("key_edit", torch.zeros(0, dtype=torch.long, device=dev))
        self.register_buffer("key_memory", torch.zeros(0, dtype=torch.long, device=dev))
        # Merge mode: F (d_in, r) with F Fᵀ the mean a aᵀ of the (projected) activations of
        # every edit the memory holds, for the replay penalty (maths.replay_factor,
        # maths.replay_penalty); replay_count tokens so far.
        self.register_buffer("replay_factor", torch.zeros(0, 0, device=dev))
        self.register_buffer("replay_count", torch.zeros((), device=dev))
        # Transient, never saved: set by the trainer and the routing context.
        self.train_delta: torch.Tensor | None = None
        self.token_mask: torch.Tensor | None = None
        self.decoding = False
        self.hold = True
        self.pooling = "mean"  # set from WiseConfig.score_pooling
        self.enabled = True
        # Cosine a prompt token must reach with one of a memory's keys for that memory to be
        # used (WiseConfig.key_gate; 0: the score alone decides).
        self.key_gate = 0.0
        # How a prompt picks among the memories that pass: "coverage" or "closest" key
        # (WiseConfig.route_by).
        self.route_by = "closest"
        # Mean cosine a prompt must reach over one edit's keys as well (WiseConfig.coverage_gate;
        # 0: the key gate alone decides).
        self.coverage_gate = 0.0
        # WiseConfig.subject_gate: a memory opens for a prompt that names one of its edits'
        # subjects (see subjects.py).  edit_subjects: (memory, subject or None) per edit, in
        # the manifest (text, so not a buffer); detokenize: the tokenizer's decode, set when
        # the model is opened; input_ids: the model's input, handed over by ``install``.
        self.subject_gate = False
        self.edit_subjects: list[tuple[int, str | None]] = []
        self.detokenize: Callable[[list[int]], str] | None = None
        self.input_ids: torch.Tensor | None = None
        self._named: tuple[torch.Tensor, torch.Tensor] | None = None  # the prompt's, kept while decoding
        self._unit_keys: tuple[torch.Tensor, torch.Tensor] | None = None
        self._edit_owner: tuple[torch.Tensor, tuple[torch.Tensor, int]] | None = None
        self.last_key_sims: torch.Tensor | None = None
        self.held_route: torch.Tensor | None = None
        self.last_scores: torch.Tensor | None = None
        self.last_token_scores: tuple[torch.Tensor, torch.Tensor] | None = None  # training only
        self.last_route: torch.Tensor | None = None

    # From this many memories (retrieve mode) on, a forward pass computes D_k a only for the
    # memories the key gate leaves open and, once routed, only for the chosen ones: at
    # T=1000 retrieve holds 100 memories, and D_k a for all of them on every token (every
    # decode step too) cost more than the base model.  Below it, everything is computed
    # without a host sync, which a GPU prefers.
    SELECTIVE_FROM = 8

    # ---- state ---------------------------------------------------------------
    FLOAT_STATE = ("memories", "thresholds", "min_edit_scores", "scale", "basis")
    OPTIONAL_STATE = ("edit_keys", "key_edit", "key_memory", "replay_factor", "replay_count")

    def wise_state(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.FLOAT_STATE + self.OPTIONAL_STATE}

    def load_wise_state(self, state: dict[str, torch.Tensor]) -> None:
        dev = self.memories.device
        for name in self.FLOAT_STATE:
            setattr(self, name, state[name].to(device=dev, dtype=torch.float32).clone())
        # Keys and replay are optional: a checkpoint without them keeps its thresholds as
        # they are and trains new edits without replay.
        for name in self.OPTIONAL_STATE:
            if name in state:
                like = getattr(self, name)
                setattr(self, name, state[name].to(device=dev, dtype=like.dtype).clone())
        if "replay_cov" in state and "replay_factor" not in state:  # written by 0.1 before factors
            cov = state["replay_cov"].to(device=dev)
            self.replay_factor = moment_factor(cov, cov.shape[0])

    def unit_keys(self) -> torch.Tensor:
        """The keys as the gate reads them: projected like the activations, unit norm.

        Cached until ``edit_keys`` is replaced (every merge makes a new tensor)."""
        if self._unit_keys is None or self._unit_keys[0] is not self.edit_keys:
            unit = F.normalize(project_out(self.edit_keys.float(), self.basis), dim=-1)
            self._unit_keys = (self.edit_keys, unit)
        return self._unit_keys[1]

    def edit_owner(self) -> tuple[torch.Tensor, int]:
        """Each key's edit numbered 0..E-1, and E; cached like ``unit_keys``."""
        if self._edit_owner is None or self._edit_owner[0] is not self.key_edit:
            self._edit_owner = (self.key_edit, edit_index(self.key_edit))
        return self._edit_owner[1]

    @property
    def n_memories(self) -> int:
        return int(self.memories.shape[0])

    # ---- forward -------------------------------------------------------------
    def _mask_for(self, t: int) -> torch.Tensor | None:
        m = self.token_mask
        if m is None:
            return None
        return m[:, -t:] if m.shape[1] >= t else None

    def _subjects_named(self, batch: int, mask: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``subjects.subject_open`` for this call's prompts, on the layer's device; None when
        the subject gate is off or the prompt's tokens are not known (the key gate decides)."""
        if not self.subject_gate or not self.edit_subjects or self.detokenize is None:
            return None
        ids = self.input_ids
        if self.decoding and self._named is not None and self._named[0].shape[1] == batch:
            return self._named  # one new token names nothing: keep the prompt's answer
        if ids is None or ids.shape[0] != batch:
            return None
        texts = prompt_texts(ids, mask, self.detokenize)
        named, keyed = subject_open(texts, self.edit_subjects, self.n_memories)
        dev = self.memories.device
        self._named = (named.to(dev), keyed.to(dev))
        return self._named

    def forward(self, a: torch.Tensor) -> torch.Tensor:  # a: (B, T, d_in)
        out = self.base_layer(a)  # (B, T, d_out)
        if self.train_delta is not None:
            delta_out = F.linear(project_out(a.float(), self.basis), self.train_delta)
            norms, m = token_scores(delta_out, self._mask_for(a.shape[1]))
            self.last_token_scores = (norms / self.scale, m)
            self.last_scores = pool_scores(norms, m, self.pooling) / self.scale
            return out + delta_out.to(out.dtype)
        if not self.enabled or self.n_memories == 0:
            return out
        a32 = a.float()  # stored memories are already projected (maths.project_rows)
        many = self.n_memories >= self.SELECTIVE_FROM
        computed: dict[int, torch.Tensor] = {}

        def delta_out(k: int) -> torch.Tensor:
            if k not in computed:
                computed[k] = F.linear(a32, self.memories[k])
            return computed[k]

        if self.decoding and self.hold and self.held_route is not None \
                and self.held_route.shape[0] == a.shape[0]:
            route = self.held_route
        else:
            mask = self._mask_for(a.shape[1])
            gated = self.key_gate > 0 and self.edit_keys.shape[0] > 0
            sims = rank = None
            open_ = None
            if gated:  # rank: what orders the memories that pass (WiseConfig.route_by)
                by_cover = self.route_by == "coverage" and self.n_memories > 1
                need_cover = by_cover or self.coverage_gate > 0
                sims, cover = key_match(project_out(a32, self.basis), mask, self.unit_keys(), self.key_memory,
                                        self.n_memories, self.edit_owner() if need_cover else None)
                rank = cover if by_cover else sims
                open_ = sims >= self.key_gate
                if self.coverage_gate > 0:
                    open_ = open_ & (cover >= self.coverage_gate)
            named = self._subjects_named(a.shape[0], mask)
            if named is not None:  # the subject gate, the key gate only for edits without a subject
                named_k, keyed = named
                key_open = open_ if open_ is not None else torch.ones_like(named_k)
                open_ = named_k | (keyed[:, None] & key_open)
            candidates: list[int] = list(range(self.n_memories))
            if many and open_ is not None:  # a memory the gate shuts for every prompt scores 0 anyway
                candidates = open_.any(dim=1).nonzero().flatten().tolist()
            scores = torch.zeros(self.n_memories, a.shape[0], device=a.device)
            for k in candidates:
                scores[k] = activation_score(delta_out(k), mask, self.pooling) / self.scale
            if open_ is not None:
                scores = torch.where(open_, scores, torch.zeros_like(scores))
                self.last_key_sims = sims
                route = choose_memory(scores, self.thresholds, rank)
            else:
                route = choose_memory(scores, self.thresholds)
            self.last_scores = scores
            self.held_route = route
        self.last_route = route
        used = list(range(self.n_memories))
        if many:  # only the memories some prompt is routed to (one sync, no K-fold matmul)
            used = [k for k in route.unique().tolist() if k != NO_MEMORY]
        extra = torch.zeros_like(out, dtype=torch.float32)
        for k in used:
            extra = extra + (route == k).to(torch.float32)[:, None, None] * delta_out(k)
        return out + extra.to(out.dtype)


def _is_decode_step(kwargs: dict) -> bool:
    # transformers 5.x passes the cache as ``cache``; earlier releases as ``past_key_values``.
    cache = next((kwargs[k] for k in ("cache", "past_key_values") if kwargs.get(k) is not None), None)
    if cache is None:
        return False
    get_len = getattr(cache, "get_seq_length", None)
    try:
        return bool(get_len() > 0) if get_len is not None else len(cache) > 0
    except (TypeError, IndexError):
        return False


def install(model: nn.Module, layer: SideMemoryLayer) -> None:
    """Give the layer the attention mask and the prefill/decode phase of each call.

    The layer sits deep inside the model and never sees ``attention_mask``; a
    forward pre-hook on the whole model hands it over, so padding never counts in a
    score and a routing decision taken on the prompt is held while generating.
    """
    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        layer.decoding = _is_decode_step(kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        layer.input_ids = ids if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None
        if getattr(layer, "_explicit_mask", False):
            return
        mask = kwargs.get("attention_mask")
        layer.token_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    model._wise_hook = model.register_forward_pre_hook(hook, with_kwargs=True)


@contextmanager
def route_on(layer: SideMemoryLayer, token_mask: torch.Tensor) -> Iterator[None]:
    """Route on these tokens only (the prompt, not the teacher-forced answer)."""
    layer.token_mask, layer._explicit_mask = token_mask, True
    try:
        yield
    finally:
        layer.token_mask, layer._explicit_mask = None, False


@contextmanager
def main_memory_only(layer: SideMemoryLayer) -> Iterator[None]:
    """The unedited model, exactly: the side memories are skipped, W is untouched."""
    prev, layer.enabled = layer.enabled, False
    try:
        yield
    finally:
        layer.enabled = prev


def route_names(route: torch.Tensor) -> list[str]:
    return ["main" if int(r) == NO_MEMORY else f"side[{int(r)}]" for r in route.tolist()]
