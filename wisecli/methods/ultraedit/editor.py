"""One UltraEdit run: each ``apply`` is a turn, read once and written in closed form."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from wisecli.batching import encode_pairs
from wisecli.methods.base import Progress
from wisecli.methods.ultraedit.config import UltraEditConfig
from wisecli.methods.ultraedit.maths import merge_moments, second_moment, weight_shift
from wisecli.methods.ultraedit.weights import EditedWeights, shape_key
from wisecli.methods.wise.augment import generate_negatives  # the same neutral text WISE's router reads
from wisecli.records import EditRecord

NEUTRAL_TEXTS, NEUTRAL_TOKENS = 64, 30  # what the preservation term is measured on, when no negatives are given


class UltraEditor:
    def __init__(self, model: nn.Module, tokenizer: Any, weights: EditedWeights, cfg: UltraEditConfig,
                 state: dict | None) -> None:
        self.model, self.tok, self.weights, self.cfg = model, tokenizer, weights, cfg
        self.n_edits = int((state or {}).get("n_edits", 0))
        self.kept: dict[str, torch.Tensor] = {}

    def prepare(self, negatives: list[str] | None, source: str) -> None:
        """The second moment of each edited layer's keys on unrelated text (the user's
        negatives, else text the unedited model writes from neutral seeds), read on the
        unedited model: what the preservation term keeps.  Measured per run, never stored:
        it is the base's, so a continued run measures what the first one did."""
        self.kept = {}
        if not self.cfg.preserve:
            return
        texts = list(negatives or []) or generate_negatives(self.model, self.tok, self.weights, NEUTRAL_TEXTS,
                                                            (NEUTRAL_TOKENS,), seed=0)
        keys: dict[str, list[torch.Tensor]] = {p: [] for p in self.weights.paths}
        device = next(self.model.parameters()).device
        for start in range(0, len(texts), self.cfg.batch_size):
            enc = self.tok(texts[start:start + self.cfg.batch_size], return_tensors="pt", padding=True,
                           return_token_type_ids=False).to(device)
            with self._recording(enc["attention_mask"].bool(), keys, None), torch.no_grad(), self.weights.main_only():
                self.model(**enc)
        self.kept = {p: second_moment(torch.cat(keys[p])) for p in self.weights.paths}

    def apply(self, records: Sequence[EditRecord], progress: Progress | None = None) -> list[dict]:
        """One turn of ``passes`` closed-form steps; each reads every edited layer's keys and
        output gradients at the answer positions on the model as the last step left it,
        advances its running statistics, and writes each layer's shift in place."""
        # rows of like length share a batch: left padding is compute spent on nothing, and the
        # solve reads the turn's rows as one set, so their order changes no shift
        ordered = sorted(records, key=lambda r: len(r.prompt) + len(r.target_new))
        for step in range(self.cfg.passes):
            keys: dict[str, list[torch.Tensor]] = {p: [] for p in self.weights.paths}
            grads: dict[str, list[torch.Tensor]] = {p: [] for p in self.weights.paths}
            for start in range(0, len(ordered), self.cfg.batch_size):
                chunk = ordered[start:start + self.cfg.batch_size]
                self._read(chunk, keys, grads)
                if progress is not None:
                    progress({"done": start + len(chunk), "shard": int(self.weights.n_turns), "step": step,
                              "loss": None})
            read = {p: torch.cat(keys[p]) for p in keys}
            self._write(step, read, {p: torch.cat(grads[p]) for p in grads})
        for path, k in read.items():  # what later turns keep answering: this turn's keys as last read
            self.weights.add_edited_keys(path, k)
        turn = int(self.weights.n_turns)
        self.weights.n_turns += 1
        self.n_edits += len(records)
        return [{"id": r.id, "shard": turn, "steps": self.cfg.passes, "memory": None, "subject": r.subject}
                for r in records]

    def _read(self, chunk: Sequence[EditRecord], keys: dict, grads: dict) -> None:
        device = next(self.model.parameters()).device
        batch = encode_pairs(self.tok, [r.prompt for r in chunk], [r.target_new for r in chunk]).to(device)
        # the positions whose output is read for an answer token: one before each
        at = torch.zeros_like(batch.labels, dtype=torch.bool)
        at[:, :-1] = batch.labels[:, 1:] != -100
        keep = batch.logits_to_keep  # answers end every row: the LM head runs on those positions only
        with self._recording(at, keys, grads), torch.enable_grad():
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                position_ids=batch.position_ids, logits_to_keep=keep).logits
            labels = batch.labels[:, -keep:]
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100, reduction="sum")
            loss.backward()

    @contextmanager
    def _recording(self, at: torch.Tensor, keys: dict, grads: dict | None) -> Iterator[None]:
        """Forward hooks keep each edited layer's inputs at ``at``; a hook on its output keeps
        the loss gradient there (nothing else is differentiated: the weights stay frozen)."""
        handles = []
        for path in self.weights.paths:
            def hook(_m: nn.Module, args: tuple, out: torch.Tensor, path: str = path) -> torch.Tensor:
                keys[path].append(args[0][at].detach().float())
                if grads is None:
                    return out
                if not out.requires_grad:
                    out = out.detach().requires_grad_(True)
                out.register_hook(lambda g, path=path: grads[path].append(g[at].detach().float()))
                return out
            handles.append(self.weights.linear(path).register_forward_hook(hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def _write(self, step: int, keys: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
        by_shape: dict[str, list[str]] = {}
        for path in self.weights.paths:
            by_shape.setdefault(shape_key(self.weights.linear(path)), []).append(path)
        stats = {}
        for shape, paths in by_shape.items():  # layers of one shape share their statistics
            feats = torch.cat([torch.cat([keys[p], grads[p]], dim=-1) for p in paths])
            mean, var, count = self.weights.moments(f"{step}_{shape}", feats.shape[1], feats.device)
            stats[shape] = merge_moments(mean, var, count, feats)
            self.weights.set_moments(f"{step}_{shape}", *stats[shape])
        for path in self.weights.paths:
            mean, var, _ = stats[shape_key(self.weights.linear(path))]
            kept = self.kept.get(path)
            kept = None if kept is None else kept * (self.cfg.preserve * keys[path].shape[0])
            earlier = self.weights.edited_moment(path)
            if earlier is not None and self.cfg.keep_edits:
                earlier = earlier * self.cfg.keep_edits
                kept = earlier if kept is None else kept + earlier
            delta = weight_shift(keys[path], grads[path], mean, var, self.cfg.learning_rate, self.cfg.ridge, kept)
            self.weights.add_shift(path, delta)

    def saved(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Each edited layer's shift and the running statistics; the JSON state counts edits."""
        tensors = {f"shift.{p}": self.weights.shift(p).detach().clone() for p in self.weights.paths}
        tensors.update(self.weights.statistics())
        return tensors, {"n_edits": self.n_edits}
