"""The side-memory layer: it stores the main memory W and the side memories D_k, and applies
the one the router picks for each example.

It replaces the FFN output projection in the model (peft-style: it keeps ``base_layer`` and
adds its own state beside it).  All tensor state is in registered buffers, so
``wise_state()`` is exactly what is saved (in fewer bits, losslessly: ``stored.stored_state``); the
only other saved state is each edit's subject and target (text, in the manifest).  The state
changes only through this class's methods;
routing settings only through ``configure``; the per-call context only through
``begin_call`` / ``end_call``, which the hooks of ``install`` call around each model call.
A generation's routing state is its ``Generation``, found again by the generation's cache.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import CacheRefresher, cache_of
from .maths import fp8_keys, from_fp8_keys, pool_scores, project_out, subspace_memory, token_scores
from .generation import Generation, Generations
from .router import RouteContext, Router, RouterConfig
from .stored import STATE_DTYPES, runtime_state

@dataclass(frozen=True)
class TrainScores:
    """Router scores of a training forward: pooled (B,), per token (B, T) and their weights."""

    pooled: torch.Tensor
    tokens: torch.Tensor
    weights: torch.Tensor


class SideMemoryLayer(nn.Module):
    """``y = W a`` (main memory) or ``y = W a + D_k a`` (side memory k), chosen per example.

    Side memories are deltas ``D_k = W'_k - W`` in float32 (float16 values: a checkpoint
    stores them in 16 bits, exactly): the router score is ``‖D_k a‖`` anyway, so storing
    the delta costs one matmul instead of two, and keeps the optimiser's precision when the
    base runs in bf16.
    """

    def __init__(self, base_layer: nn.Module, kind: str, in_features: int, out_features: int,
                 tokenizer: Any = None) -> None:
        super().__init__()
        self.base_layer, self.kind = base_layer, kind
        self.in_features, self.out_features = in_features, out_features
        dev = next(base_layer.parameters()).device
        empty = {"memories": (0, out_features, in_features), "thresholds": (0,), "min_edit_scores": (0,),
                 "scale": (), "basis": (in_features, 0), "edit_keys": (0, in_features), "key_edit": (0,),
                 "key_memory": (0,), "answer_keys": (0, in_features), "answer_key_edit": (0,),
                 "other_keys": (0, in_features), "other_key_edit": (0,),
                 "replay_factor": (0, 0), "replay_count": (), "shard_factors": (0, out_features, 0),
                 "shard_memory": (0,), "shard_seeds": (0,)}
        for name, shape in empty.items():
            self.register_buffer(name, torch.zeros(shape, dtype=STATE_DTYPES[name], device=dev))
        self.scale.fill_(1.0)
        # Per edit: (memory, subject or None), in edit order (the subject gate's; text, so
        # it lives in the manifest, not in a buffer).
        self.edit_subjects: list[tuple[int, str | None]] = []
        # Per edit: (memory, new target): what generation follows while a memory answers.
        self.edit_targets: list[tuple[int, str]] = []
        self.router = Router(RouterConfig.plain(), tokenizer)
        # Transient, never saved.
        self._ctx = RouteContext()
        self._generations = Generations()
        self.last_generation: Generation | None = None  # the last routed call's, read after generate()
        self.installed: Installed | None = None  # the hooks that feed begin_call / end_call
        self._train_delta: torch.Tensor | None = None
        self._mask_override: torch.Tensor | None = None
        self._enabled = True
        self.train_scores: TrainScores | None = None

    # ---- state -------------------------------------------------------------------------
    def wise_state(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in STATE_DTYPES}

    def load_wise_state(self, state: dict[str, torch.Tensor],
                        subjects: Sequence[tuple[int, str | None]] = (),
                        targets: Sequence[tuple[int, str]] = ()) -> None:
        """Restore every buffer from the layer's state or a checkpoint's (``stored_state``;
        ``manifest.upgrade`` has filled what older checkpoints lack)."""
        dev = self.memories.device
        state = runtime_state(state)
        for name, dtype in STATE_DTYPES.items():
            setattr(self, name, state[name].to(device=dev, dtype=dtype).clone())
        self.edit_subjects = [(int(k), s) for k, s in subjects]
        self.edit_targets = [(int(k), t) for k, t in targets]

    def configure(self, routing: RouterConfig) -> None:
        """The one way routing settings reach the layer."""
        self.router.configure(routing)

    @property
    def n_memories(self) -> int:
        return int(self.memories.shape[0])

    @property
    def last_route(self) -> torch.Tensor | None:
        return self.router.last_route

    @property
    def last_scores(self) -> torch.Tensor | None:
        return self.router.last_scores

    @property
    def held_route(self) -> torch.Tensor | None:
        """(B,) the last routed call's route, as its generation holds it."""
        return None if self.last_generation is None else self.last_generation.held

    @property
    def answered_route(self) -> torch.Tensor | None:
        """(B,) the memory that answered the last generation: the prompt's, else the first one
        a generated token was routed to (NO_MEMORY: none)."""
        return None if self.last_generation is None else self.last_generation.answered

    # ---- what editing changes ------------------------------------------------------------
    def calibrate(self, scale: float, basis: torch.Tensor) -> None:
        """The score unit and the null-space basis, measured once per model on neutral text."""
        self.scale = torch.tensor(float(scale), device=self.memories.device)
        self.basis = basis.to(device=self.memories.device, dtype=torch.float32)

    def add_memory(self, delta: torch.Tensor) -> int:
        """A new side memory (threshold set by ``set_threshold``); returns its index.  Held in
        float16 values, so what a checkpoint stores in 16 bits is exactly what answers here."""
        dev = self.memories.device
        self.memories = torch.cat([self.memories, delta[None].to(dev).half().float()])
        self.min_edit_scores = torch.cat([self.min_edit_scores, torch.full((1,), float("inf"), device=dev)])
        self.thresholds = torch.cat([self.thresholds, torch.zeros(1, device=dev)])
        return self.n_memories - 1

    def replace_memory(self, k: int, delta: torch.Tensor) -> None:
        self.memories[k] = delta.half().float()

    def add_shards(self, k: int, factors: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """Subspace shards (``maths.subspace_memory``) merged into memory k, which is returned.

        A memory made of such shards only is rebuilt from all its factors, exactly as a
        checkpoint that stores the factors alone will rebuild it; one that holds anything else
        (a masked memory of an older checkpoint) keeps it and adds the new shards."""
        dev = self.memories.device
        factors = factors.to(dev).half().float()  # stored in 16 bits, exactly
        if not self.shard_factors.numel() and self.shard_factors.shape[2] != factors.shape[2]:
            self.shard_factors = self.shard_factors.new_zeros(0, self.out_features, factors.shape[2])
        whole = torch.equal(self.memories[k], self.memory_from_shards(k))
        self.shard_factors = torch.cat([self.shard_factors, factors])
        self.shard_memory = torch.cat([self.shard_memory, torch.full((len(factors),), k, device=dev)])
        self.shard_seeds = torch.cat([self.shard_seeds, seeds.to(dev)])
        if whole:
            self.memories[k] = self.memory_from_shards(k)
        else:
            new = subspace_memory(factors, seeds, self.basis)
            self.memories[k] = (self.memories[k] + new).half().float()
        return self.memories[k]

    def memory_from_shards(self, k: int) -> torch.Tensor:
        """Memory k as its subspace shards alone make it (zeros if it has none)."""
        sel = self.shard_memory == k
        if not bool(sel.any()):
            return torch.zeros_like(self.memories[k])
        return subspace_memory(self.shard_factors[sel], self.shard_seeds[sel], self.basis)

    def set_threshold(self, k: int, min_edit_score: torch.Tensor, act_ratio: float) -> None:
        self.min_edit_scores[k] = min_edit_score
        self.thresholds[k] = act_ratio * self.min_edit_scores[k]

    def add_keys(self, acts: torch.Tensor, real: torch.Tensor, k: int,
                 answers: torch.Tensor | None = None,
                 others: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Router keys of new edits held by memory k: acts (E, n, d_in), real (E, n) bool
        (filler where a prompt has fewer tokens); answers (E, m, d_in): their answer
        positions (the answer gate's keys); others, (E, o, d_in) and (E, o) real: the answer
        positions of other relations of their subjects (the gate stays shut nearer those).  Edits are
        numbered on from the last."""
        dev = self.memories.device
        first = int(self.key_edit.max()) + 1 if self.key_edit.numel() else 0
        owner = torch.arange(first, first + acts.shape[0], device=dev)[:, None]
        keys = from_fp8_keys(*fp8_keys(acts[real]))  # what a checkpoint stores, exactly
        self.edit_keys = torch.cat([self.edit_keys, keys.to(self.edit_keys.dtype)])
        self.key_edit = torch.cat([self.key_edit, owner.expand_as(real)[real]])
        self.key_memory = torch.cat([self.key_memory, torch.full((int(real.sum()),), k, device=dev)])
        if answers is not None:
            self.answer_keys, self.answer_key_edit = self._with_keys("answer", answers, owner)
        if others is not None:
            self.other_keys, self.other_key_edit = self._with_keys("other", others[0], owner, others[1])

    def _with_keys(self, name: str, new: torch.Tensor, owner: torch.Tensor,
                   real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``{name}_keys`` and ``{name}_key_edit`` with the (E, m, d_in) ``new`` keys appended
        (where ``real``, (E, m), says a key is one)."""
        keys, key_edit = getattr(self, f"{name}_keys"), getattr(self, f"{name}_key_edit")
        real = torch.ones(new.shape[:2], dtype=torch.bool) if real is None else real.cpu()
        flat = from_fp8_keys(*fp8_keys(new[real.to(new.device)]))
        return (torch.cat([keys, flat.to(keys.dtype).to(keys.device)]),
                torch.cat([key_edit, owner.expand(-1, new.shape[1])[real.to(owner.device)]]))

    def add_edits(self, k: int, subjects: Sequence[str | None], targets: Sequence[str]) -> None:
        """New edits held by memory k: their subjects and targets (text, in the manifest)."""
        self.edit_subjects.extend((int(k), s) for s in subjects)
        self.edit_targets.extend((int(k), t) for t in targets)

    def set_replay(self, factor: torch.Tensor, count: float) -> None:
        """Merge mode's replay factor (``maths.replay_factor``); empty for a fresh memory."""
        self.replay_factor = factor.to(self.memories.device).half().float()  # stored in 16 bits, exactly
        self.replay_count = torch.tensor(float(count), device=self.memories.device)

    # ---- per call ------------------------------------------------------------------------
    def begin_call(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                   decoding: bool, cache: Any = None) -> None:
        """Called by the model-level hook before each model call: the router's context.  A
        decode step goes on with the generation its cache carries (``Generations``); anything
        else is a prompt, which starts one."""
        mask = self._mask_override if self._mask_override is not None else attention_mask
        if self._train_delta is not None or not self._enabled or self.n_memories == 0:
            self.router.last_route = None
            self._ctx = RouteContext(mask, decoding, ids=input_ids)
            return
        generation = self._generations.find(cache) if decoding else None
        self._ctx = self.router.context(input_ids, mask, generation, self)
        self.last_generation = self._ctx.generation

    def end_call(self, cache: Any) -> None:
        """Called by the model-level hook after each model call: the cache it returns carries
        the generation its decode steps continue."""
        if self._ctx.generation is not None and cache is not None:
            self._generations.bind(cache, self._ctx.generation)

    def generation_of(self, cache: Any) -> Generation | None:
        """The generation a cache carries (None: not one this layer routes), for a caller
        that drives its own decoding loop and joins or drops rows between calls."""
        return self._generations.find(cache)

    def take_refresh(self) -> tuple[torch.Tensor, torch.Tensor, Generation] | None:
        """This call's rows whose answer was just written, the text their cache holds, and
        their generation (``Generation.take_refresh``)."""
        gen = self._ctx.generation
        pending = gen.take_refresh() if gen is not None and self._ctx.decoding else None
        return None if pending is None else (*pending, gen)

    def recording(self) -> Generation | None:
        """The generation whose residual stream is being recorded in this call, if any."""
        gen = self._ctx.generation
        return gen if gen is not None and gen.follows else None

    @contextmanager
    def routing_on(self, token_mask: torch.Tensor) -> Iterator[None]:
        """Route on these tokens only (the prompt, not a teacher-forced answer)."""
        prev, self._mask_override = self._mask_override, token_mask
        try:
            yield
        finally:
            self._mask_override = prev

    @contextmanager
    def with_delta(self, delta: torch.Tensor, token_mask: torch.Tensor) -> Iterator[None]:
        """Forward passes apply ``delta`` to every row and record its router scores on the
        tokens of ``token_mask`` (``train_scores``): one shard's optimisation."""
        prev = self._train_delta, self._mask_override
        self._train_delta, self._mask_override = delta, token_mask
        try:
            yield
        finally:
            self._train_delta, self._mask_override = prev

    @contextmanager
    def main_only(self) -> Iterator[None]:
        """The unedited model, exactly: the side memories are skipped, W is untouched."""
        prev, self._enabled = self._enabled, False
        try:
            yield
        finally:
            self._enabled = prev

    # ---- forward -------------------------------------------------------------------------
    def forward(self, a: torch.Tensor) -> torch.Tensor:  # a: (B, T, d_in)
        out = self.base_layer(a)  # (B, T, d_out)
        if self._train_delta is not None:
            return self._train_forward(a, out)
        if not self._enabled or self.n_memories == 0:
            return out
        delta_out = _Outputs(a.float(), self.memories)  # stored memories are already projected
        route = self.router.route(delta_out.a32, self._ctx, self, delta_out)
        return out + self._apply(route, delta_out, out).to(out.dtype)

    def _train_forward(self, a: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        delta_out = F.linear(project_out(a.float(), self.basis), self._train_delta)
        norms, m = token_scores(delta_out, self._ctx.mask_for(a.shape[1]))
        pooled = pool_scores(norms, m, self.router.cfg.pooling) / self.scale
        self.train_scores = TrainScores(pooled, norms / self.scale, m)
        return out + delta_out.to(out.dtype)

    def _apply(self, route: torch.Tensor, delta_out: "_Outputs", out: torch.Tensor) -> torch.Tensor:
        """Σ_k [route == k] D_k a, float32."""
        extra = torch.zeros_like(out, dtype=torch.float32)
        for k in self.router.applied(route, self.n_memories):
            extra = extra + (route == k).to(torch.float32)[:, None, None] * delta_out(k)
        return extra


class _Outputs:
    """D_k a for one input, computed at most once per memory and only when asked for."""

    def __init__(self, a32: torch.Tensor, memories: torch.Tensor) -> None:
        self.a32, self.memories = a32, memories
        self._done: dict[int, torch.Tensor] = {}

    def __call__(self, k: int) -> torch.Tensor:
        if k not in self._done:
            self._done[k] = F.linear(self.a32, self.memories[k])
        return self._done[k]


def _is_decode_step(kwargs: dict) -> bool:
    cache = cache_of(kwargs)
    if cache is None:
        return False
    get_len = getattr(cache, "get_seq_length", None)
    try:
        return bool(get_len() > 0) if get_len is not None else len(cache) > 0
    except (TypeError, IndexError):
        return False


class Installed:
    """What ``install`` adds to a model: its two hooks and the cache refresher (owned by the
    layer, so nothing is set on the transformers model)."""

    def __init__(self, model: nn.Module, layer: "SideMemoryLayer") -> None:
        self.refresher = CacheRefresher(model, layer, layer.main_only, layer.recording)

        def before(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            layer.begin_call(ids if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None,
                             mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None,
                             _is_decode_step(kwargs), cache_of(kwargs))
            pending = layer.take_refresh()
            if pending is not None:
                self.refresher.refresh(kwargs, *pending)

        def after(_module: nn.Module, _args: tuple, _kwargs: dict, output: Any) -> None:
            layer.end_call(_returned_cache(output))

        self.handles = (model.register_forward_pre_hook(before, with_kwargs=True),
                        model.register_forward_hook(after, with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.refresher.close()


def _returned_cache(output: Any) -> Any:
    # transformers 5.x names the returned cache ``cache`` (its ``past_key_values`` attribute
    # warns); earlier releases ``past_key_values``.
    keys = getattr(output, "keys", None)
    if keys is None:
        return None
    name = next((k for k in ("cache", "past_key_values") if k in keys()), None)
    return None if name is None else output[name]


def install(model: nn.Module, layer: SideMemoryLayer) -> None:
    """Give the layer each model call's input ids, attention mask, cache and prefill/decode phase.

    The layer sits deep inside the model and never sees them; a forward pre-hook on the
    whole model hands them over once per call, so padding never counts in a score, the
    subject gate reads the prompt's text once, and a decode step finds its generation's
    state by its cache.  It is also where a generation step can rewrite the cache: once a
    memory has written its answer, that row's cache is recomputed without it
    (``cache.CacheRefresher``), so what follows reads the unedited model's states.
    """
    uninstall(model)
    layer.installed = Installed(model, layer)


def uninstall(model: nn.Module) -> None:
    """Remove what ``install`` added (before the memory layer is taken out of the model)."""
    for module in model.modules():
        if isinstance(module, SideMemoryLayer) and module.installed is not None:
            module.installed.remove()
            module.installed = None
