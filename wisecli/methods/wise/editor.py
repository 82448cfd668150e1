"""Lifelong editing: shards, merges, side memories and router thresholds over time.

``WiseEditor`` owns the schedule (which edits form a shard, when shards merge,
which memory they go to); the maths is in ``maths.py`` and one shard's
optimisation in ``train.py``.  All state that must outlive a run is either in
the ``SideMemoryLayer`` buffers (tensors) or in ``EditorState`` (JSON).
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from wisecli.batching import Batch, encode_pairs
from wisecli.methods.wise.config import WiseConfig
from wisecli.records import EditRecord
from wisecli.errors import TrainingDiverged
from wisecli.methods.wise.augment import (chat_turns, embedding_ranker, generate_negatives, generate_prefixes, neighbours, other_relations, reworded,
                      subject_of, with_prefix)
from wisecli.runtime.maths import (common_basis, counted_tokens, distinct_tokens, last_token, loudest_tokens, merge_ties, min_edit_score,
                    project_out, project_rows, replay_factor, scored_tokens, shard_mask, shard_subspace)
from wisecli.runtime.memory import SideMemoryLayer
from wisecli.runtime.stored import stored_state
from wisecli.runtime.router import RouterConfig
from wisecli.methods.wise.positions import last_inputs, layer_inputs
from wisecli.methods.wise.train import IRRELEVANT, NEAR_MISS, RowsForward, ShardResult, train_shard


def _check_finite(res: ShardResult, index: int, cfg: WiseConfig) -> None:
    """A shard whose update went to NaN or Inf would be merged into the memory and saved: every
    edit it holds lost, and every later score with them.  Stop the run instead."""
    if not bool(torch.isfinite(res.delta).all()):
        raise TrainingDiverged(
            f"shard {index}: training diverged (the side memory's update went to NaN/Inf)",
            hint=f"lower learning_rate (now {cfg.learning_rate}) or replay_weight (now {cfg.replay_weight}) "
                 "in --config; nothing was written")


@dataclass
class EditorState:
    """The JSON half of the editor's state (the tensors live in the layer)."""

    prefixes: list[str] = field(default_factory=list)
    negatives: list[str] = field(default_factory=list)
    negatives_source: str = "generated"
    shards_trained: int = 0
    memory_edit_counts: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EditorState":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


ProgressFn = Callable[[dict[str, Any]], None]


class WiseEditor:
    def __init__(self, model: nn.Module, tokenizer, mem: SideMemoryLayer, blocks: nn.ModuleList,
                 layer: int, cfg: WiseConfig, state: EditorState | None = None,
                 forward_factory: Callable[[Batch], RowsForward] | None = None) -> None:
        self.model, self.tok, self.mem, self.blocks, self.layer = model, tokenizer, mem, blocks, layer
        self.cfg = cfg
        self.state = state or EditorState()
        self.device = mem.memories.device
        self._rank = embedding_ranker(model, tokenizer)
        mem.configure(RouterConfig.from_config(cfg))
        # The benchmark's full-forward reference loop (``bench.reference``); editing never has one.
        self.forward_factory = forward_factory
        self._known: tuple[tuple[str, ...], torch.Tensor] | None = None
        self._reference: tuple[tuple[str, ...], torch.Tensor] | None = None

    def snapshot(self) -> tuple[dict[str, torch.Tensor], list, list, dict[str, Any]]:
        """Everything ``apply`` changes, copied: the layer's buffers and edit texts, the JSON state."""
        mem = self.mem
        return ({k: v.clone() for k, v in mem.wise_state().items()}, list(mem.edit_subjects),
                list(mem.edit_targets), copy.deepcopy(self.state.to_dict()))

    def rollback(self, snap: tuple[dict[str, torch.Tensor], list, list, dict[str, Any]]) -> None:
        """Back to a ``snapshot``: the same edits can be applied again (the benchmark times them twice)."""
        self.mem.load_wise_state(snap[0], snap[1], snap[2])
        self.state = EditorState.from_dict(copy.deepcopy(snap[3]))

    def saved(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The layer's buffers as stored and the JSON half (``EditorState``): what a later run restores."""
        return stored_state(self.mem.wise_state()), self.state.to_dict()

    # ---- one-time preparation --------------------------------------------------
    def prepare(self, negatives: list[str] | None = None, source: str = "generated") -> None:
        """Prefixes, irrelevant prompts and the score unit, made once per model."""
        st, cfg = self.state, self.cfg
        if negatives is not None:
            gen = torch.Generator().manual_seed(cfg.seed)
            order = torch.randperm(len(negatives), generator=gen)[: cfg.n_negatives].tolist()
            st.negatives, st.negatives_source = [negatives[i] for i in order], source
        if not st.prefixes and cfg.n_prefixes:
            st.prefixes = generate_prefixes(self.model, self.tok, self.mem, cfg.n_prefixes,
                                            cfg.prefix_lengths, cfg.seed)
        if not st.negatives:
            st.negatives = generate_negatives(self.model, self.tok, self.mem, cfg.n_negatives,
                                              cfg.negative_lengths, cfg.seed)
            st.negatives_source = "generated"
        if self.mem.n_memories == 0 and st.shards_trained == 0:
            self.mem.calibrate(*self.measure_scale(st.negatives))

    @torch.no_grad()
    def measure_scale(self, texts: list[str]) -> tuple[float, torch.Tensor]:
        """Median ‖W a_t‖ over the tokens of neutral text (the unit of router scores), and the
        null-space basis of the same activations.

        The median, not the mean: a few tokens carry activations 100x the rest.
        """
        batch, raw = self._layer_inputs(texts)
        acts = raw.float()
        keep = scored_tokens(batch.attention_mask, acts[..., 0]) > 0
        # Never more than an eighth of the space: the rest must stay free for the edits.
        rank = min(self.cfg.null_space_rank, self.mem.in_features // 8)
        basis = common_basis(acts[keep], rank).to(self.device)
        norms = self.mem.base_layer(raw).float().norm(dim=-1)
        return float(norms[keep].median().clamp_min(1e-6)), basis

    @torch.no_grad()
    def _layer_inputs(self, texts: list[str], templated: list[bool] | None = None) -> tuple[Batch, torch.Tensor]:
        """The unedited model's input to the side-memory layer for each text (B, T, d_in)."""
        return layer_inputs(self.model, self.tok, self.mem, texts, templated)

    def _negative_acts(self) -> torch.Tensor:
        """The irrelevant prompts' inputs to the layer, recorded once for every shard.

        They are the same prompts in every shard and nothing below the side memory
        changes, so running them again per shard (most of the rows) is wasted work.
        """
        key = tuple(self.state.negatives)
        if self._known is None or self._known[0] != key:
            self._known = (key, self._layer_inputs(list(key))[1])
        return self._known[1]

    # ---- training rows -----------------------------------------------------------
    def shard_batch(self, edits: list[EditRecord]) -> tuple[Batch, torch.Tensor]:
        """Each edit under every prefix (CE + margin), then the irrelevant prompts (margin)."""
        queries, answers, row_edit, templated = [], [], [], []
        prefixes = self.state.prefixes
        for i, e in enumerate(edits):
            # Reworded copies go under the prefixes in turn, so no two rows are alike.
            variants = [with_prefix(p, e.prompt) for p in [""] + prefixes] + [
                with_prefix(prefixes[j % len(prefixes)] if prefixes else "", text)
                for j, text in enumerate(reworded(e.prompt, e.subject, self.cfg.n_rewordings,
                                                  self._edit_seed(e)))]
            chats = chat_turns(self.tok, e.prompt) if self.cfg.chat_turns else []
            queries += variants + chats
            answers += [e.target_new] * (len(variants) + len(chats))
            row_edit += [i] * (len(variants) + len(chats))
            templated += [False] * len(variants) + [True] * len(chats)
        for e in edits:  # near misses: always in the step (row -2)
            for text in self._near_misses(e):
                queries.append(text)
                answers.append(None)
                row_edit.append(NEAR_MISS)
        for text in self.state.negatives:  # generic irrelevant text: sampled per step (row -1)
            queries.append(text)
            answers.append(None)
            row_edit.append(IRRELEVANT)
        templated += [False] * (len(queries) - len(templated))
        return encode_pairs(self.tok, queries, answers, templated=templated), torch.tensor(row_edit)

    # ---- the schedule --------------------------------------------------------------
    def _fold_into_last(self, n_edits: int) -> bool:
        """Merge mode: whether the next group joins the newest memory or opens a new one."""
        counts, cap = self.state.memory_edit_counts, self.cfg.edits_per_memory
        if self.cfg.mode != "merge" or not self.mem.n_memories:
            return False
        return cap == 0 or counts[-1] + n_edits <= cap

    def _start_delta(self, fold: bool) -> torch.Tensor:
        if fold:
            return self.mem.memories[-1].clone()
        if self.cfg.mode == "merge":  # a new memory: earlier edits live elsewhere, nothing to replay
            self.mem.set_replay(torch.zeros(0, 0), 0.0)
        return torch.zeros(self.mem.out_features, self.mem.in_features, device=self.device)

    def apply(self, edits: list[EditRecord], progress: ProgressFn | None = None) -> list[dict]:
        """Train all edits in shards, merging every ``shards_per_merge``; returns per-edit placement."""
        cfg = self.cfg
        shards = [edits[i:i + cfg.edits_per_shard] for i in range(0, len(edits), cfg.edits_per_shard)]
        placed: list[dict] = []
        done = 0
        for g in range(0, len(shards), cfg.shards_per_merge):
            group = shards[g:g + cfg.shards_per_merge]
            fold = self._fold_into_last(sum(len(s) for s in group))
            start = self._start_delta(fold)
            results: list[ShardResult] = []
            indices: list[int] = []
            for shard in group:
                index = self.state.shards_trained
                batch, row_edit = self.shard_batch(shard)
                mask = self._shard_write(start.shape, index)

                def report(step: int, loss: float, active: int, _n=len(shard), _d=done) -> None:
                    if progress:
                        progress({"done": _d, "step": step, "loss": loss, "active": active,
                                  "shard": index, "shard_size": _n})
                forward = self.forward_factory(batch.to(self.device)) if self.forward_factory else None
                known = self._negative_acts() if forward is None and self.state.negatives else None
                res = train_shard(self.model, self.mem, self.blocks, self.layer, batch, row_edit,
                                  start, mask, cfg, forward=forward, progress=report,
                                  replay=self._replay(), known=known)
                _check_finite(res, index, cfg)
                results.append(res)
                indices.append(index)
                self.state.shards_trained += 1
                done += len(shard)
                if progress:
                    progress({"done": done, "step": res.steps, "loss": res.loss, "active": 0,
                              "shard": index, "shard_size": len(shard), "shard_done": True})
                for e in shard:
                    placed.append({"id": e.id, "shard": index, "steps": res.steps})
            group_edits = [e for s in group for e in s]
            k = self._merge(results, start, group_edits, fold, indices)
            for p, e in zip(placed[len(placed) - len(group_edits):], group_edits):
                p["memory"], p["subject"] = k, subject_of(e.prompt, e.subject)
            self.mem.add_edits(k, [p["subject"] for p in placed[len(placed) - len(group_edits):]],
                               [e.target_new for e in group_edits])
        return placed

    def _shard_write(self, shape: torch.Size, index: int) -> torch.Tensor:
        """Where shard ``index`` may write: its random mask, or its random input subspace
        (outside the null-space basis, so the memory it makes needs no projection)."""
        cfg, seed = self.cfg, self._shard_seed(index)
        if not cfg.shard_rank:
            return shard_mask(shape, cfg.mask_ratio, seed, self.device)
        rank = min(cfg.shard_rank, shape[1])
        sub = shard_subspace(rank, shape[1], seed, cfg.mask_ratio).to(self.device)
        return project_out(sub, self.mem.basis)

    def _replay(self) -> torch.Tensor | None:
        """Earlier edits' replay factor, when new shards train on top of them (merge mode)."""
        mem = self.mem
        if self.cfg.mode != "merge" or not self.cfg.replay_weight or not mem.replay_factor.numel():
            return None
        return mem.replay_factor

    @torch.no_grad()
    def _add_replay(self, results: list[ShardResult]) -> None:
        """Fold the group's edit-row activations (answers and prefixed copies too) into the factor."""
        mem = self.mem
        if self.cfg.mode != "merge" or not self.cfg.replay_weight \
                or any(r.edit_acts is None for r in results):
            return
        new = torch.cat([counted_tokens(project_out(r.edit_acts.float(), mem.basis), r.edit_attn)
                         for r in results])
        mem.set_replay(*replay_factor(mem.replay_factor, float(mem.replay_count), new, self.cfg.replay_rank))

    def _merge(self, results: list[ShardResult], start: torch.Tensor,
               edits: list[EditRecord], fold: bool, indices: list[int]) -> int:
        """Merge a group of shards (TIES for masked shards, a sum for subspace shards, which
        write through near-orthogonal directions); merge mode folds it into the newest memory
        until that holds ``edits_per_memory``, otherwise (and always in retrieve mode) it
        becomes a new one.  The memory's threshold is then re-measured over every edit it
        holds, under the memory as it is now: each merge raises all its scores."""
        cfg, mem = self.cfg, self.mem
        if fold:
            k = mem.n_memories - 1
        else:
            k = mem.add_memory(torch.zeros_like(start))
            self.state.memory_edit_counts.append(0)
        if cfg.shard_rank:
            rank = results[0].factor.shape[1]
            factors = torch.stack([r.factor for r in results]) * (cfg.mask_ratio / rank) ** 0.5
            new = mem.add_shards(k, factors, torch.tensor([self._shard_seed(i) for i in indices]))
        else:
            new = project_rows(start + merge_ties([r.delta for r in results]), mem.basis)
            mem.replace_memory(k, new)
        self._add_keys(edits, k, new, results)
        sel = mem.key_memory == k
        mem.set_threshold(k, min_edit_score(mem.edit_keys[sel], mem.key_edit[sel], new, mem.scale,
                                            cfg.score_pooling), cfg.act_ratio)
        self._add_replay(results)
        self.state.memory_edit_counts[k] += len(edits)
        return k

    def _shard_seed(self, index: int) -> int:
        return self.cfg.seed * 1_000_003 + index

    def _edit_seed(self, e: EditRecord) -> int:
        """A seed per edit from its prompt: the same rows whichever batch it arrives in."""
        return self.cfg.seed + int(hashlib.sha256(e.prompt.encode()).hexdigest()[:8], 16)

    def _near_misses(self, e: EditRecord) -> list[str]:
        return neighbours(e.prompt, e.subject, self.cfg.n_neighbours, self._edit_seed(e), self._rank)

    @torch.no_grad()
    def _reference_tokens(self, edits: list[EditRecord]) -> torch.Tensor:
        """(N, d_in) activations keys must not match: the irrelevant prompts' tokens (once per
        editor) and these edits' near misses."""
        def tokens(texts: list[str]) -> torch.Tensor:
            if not texts:
                return torch.zeros(0, self.mem.in_features, device=self.device)
            batch, raw = self._layer_inputs(texts)
            return raw[scored_tokens(batch.query_mask, raw[..., 0]) > 0].float()
        key = tuple(self.state.negatives)
        if self._reference is None or self._reference[0] != key:
            self._reference = (key, tokens(list(key)))
        near = tokens([t for e in edits for t in self._near_misses(e)])
        return torch.cat([self._reference[1], near])

    @torch.no_grad()
    def _add_keys(self, edits: list[EditRecord], k: int, memory: torch.Tensor,
                  results: list[ShardResult] | None = None) -> None:
        """Keep each edit's loudest prompt activations under ``memory`` as router keys (with
        ``key_choice: distinct``, the loudest of those no near miss or irrelevant prompt matches)."""
        mem = self.mem
        recorded = self._recorded_keys(results)
        if recorded is None:
            batch, raw = self._layer_inputs([e.prompt for e in edits])
            prompts, query = raw.float(), batch.query_mask
        else:
            prompts, query, answers = recorded
        if self.cfg.key_choice == "distinct" and self.cfg.key_gate > 0:
            acts, real = distinct_tokens(prompts, query, memory, self.cfg.keys_per_edit,
                                         self._reference_tokens(edits), mem.basis, self.cfg.key_gate)
        else:
            acts, real = loudest_tokens(prompts, query, memory, self.cfg.keys_per_edit)
        gate = self.cfg.answer_gate > 0
        if gate and recorded is None:
            answers = self._answer_keys(edits)
        mem.add_keys(acts, real, k, answers if gate else None,
                     self._other_keys(edits) if gate and self.cfg.other_relations else None)

    def _recorded_keys(self, results: list[ShardResult] | None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The group's bare prompts' layer inputs and query masks, (E, T, d_in) and (E, T), and
        their answer keys (E, m, d_in), read from the rows the shards recorded for training
        (each edit's bare prompt first, its chat turns last): the same activations a second
        pass would compute (to float rounding), for none of its cost.  None where a shard
        recorded nothing (the benchmark's reference loop)."""
        if not results or any(r.edit_query is None for r in results):
            return None
        n_chat = len(chat_turns(self.tok, "x")) if self.cfg.chat_turns else 0
        width = max(r.edit_acts.shape[1] for r in results)
        prompts, query, answers = [], [], []
        for r in results:
            acts = r.edit_acts.view(r.n_edits, -1, *r.edit_acts.shape[1:])
            mask = r.edit_query.view(r.n_edits, -1, r.edit_query.shape[-1])
            rows = [0] + list(range(acts.shape[1] - n_chat, acts.shape[1]))
            answers.append(torch.stack([last_token(acts[:, j].float(), mask[:, j]) for j in rows], 1))
            pad = width - acts.shape[2]  # left padding, like every batch here
            prompts.append(torch.nn.functional.pad(acts[:, 0].float(), (0, 0, pad, 0)))
            query.append(torch.nn.functional.pad(mask[:, 0], (pad, 0)))
        return torch.cat(prompts), torch.cat(query), torch.cat(answers)

    @torch.no_grad()
    def _answer_keys(self, edits: list[EditRecord]) -> torch.Tensor:
        """(E, m, d_in): where each edit's answer is predicted in the ways it was trained: the
        bare prompt, and as chat turns (the reply's start, and the end of a reply restating
        the prompt).  Not under a prefix: on KnowEdit's other relations of the same subject
        that key matched 37 % at cosine 0.6, against 25 % for the bare prompt's, and let 1 %
        more rephrases through (docs/experiments.md, "The answer gate")."""
        chats = [chat_turns(self.tok, e.prompt) if self.cfg.chat_turns else [] for e in edits]
        rows = [[e.prompt, *c] for e, c in zip(edits, chats)]
        templated = [i > 0 for row in rows for i in range(len(row))]  # chat rows as asked
        acts = last_inputs(self.model, self.tok, self.mem, [r for row in rows for r in row], templated)
        return acts.reshape(len(edits), len(rows[0]), -1)

    @torch.no_grad()
    def _other_keys(self, edits: list[EditRecord]) -> tuple[torch.Tensor, torch.Tensor]:
        """(E, o, d_in) and (E, o) real: the answer positions of other relations of each edit's
        subject (``augment.other_relations``): with a chat template, the reply's start to the
        completion and to the question; without one, both as completions.  Not the completion
        under a template, nor a reply restating it: a completion is kept by the answer gate
        alone, and a rephrase of the edit written in the same frame ("The author of Hamlet is"
        against "The genre of Hamlet is") lies nearer those than its own prompt (demo
        generalization 0.517 with them, 0.667 without; docs/experiments.md, 2026-12-08).  An
        edit without a subject has none (filler rows, not real)."""
        rows: list[list[tuple[str, bool]]] = []
        chat = self.cfg.chat_turns and bool(getattr(self.tok, "chat_template", None))
        for e in edits:
            row: list[tuple[str, bool]] = []
            for completion, question in other_relations(e.prompt, e.subject, self.cfg.other_relations,
                                                        self._edit_seed(e)):
                if chat:
                    head_c, head_q = chat_turns(self.tok, completion)[0], chat_turns(self.tok, question)[0]
                    row += [(head_c, True), (head_q, True)]
                else:
                    row += [(completion, False), (question, False)]
            rows.append(row)
        width = max(len(r) for r in rows)
        real = torch.tensor([[i < len(r) for i in range(width)] for r in rows], dtype=torch.bool)
        if width == 0:
            return torch.zeros(len(edits), 0, self.mem.in_features, device=self.device), real
        flat = [r[i] if i < len(r) else (e.prompt, False) for r, e in zip(rows, edits) for i in range(width)]
        acts = last_inputs(self.model, self.tok, self.mem, [t for t, _ in flat], [c for _, c in flat])
        return acts.reshape(len(edits), width, -1), real
