"""The served model's one worker: admitted requests wait in a bounded queue and join the
running batch between decode steps (continuous batching).

The worker prefills what is waiting as a group, appends it to the running batch
(``decoding.Batch.join``) and steps every row once per loop; a row leaves the batch the step
it finishes.  When idle, it gathers what arrives within a few milliseconds before the first
prefill, so requests sent together are read together.  Every row keeps its own settings and
its own seeded generator; the side-memory layer routes, answers and refreshes each row on
its own.  A cache that cannot be joined runs as a batch of its own, stepped in turn.

The worker runs on the thread that calls ``run`` (the main thread): PyTorch's CPU pool
served a generation from another thread on one core only.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Any, Callable

import torch

from wisecli.app.serve.decoding import Batch, choose
from wisecli.app.serve.rows import Row
from wisecli.app.serve.stats import Stats

GATHER_QUIET = 0.015   # seconds without a new arrival that close a first batch being gathered
GATHER_MOST = 0.06     # the longest a first batch waits for companions


class QueueFull(Exception):
    """More rows are waiting than ``max_queue`` allows; ``retry_after`` is a guess in seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server is busy; retry after {retry_after} s")
        self.retry_after = retry_after


class Batcher:
    def __init__(self, model: Any, tokenizer: Any, layer: Any, stats: Stats, max_batch: int,
                 max_queue: int) -> None:
        self.model, self.tok, self.layer, self.stats = model, tokenizer, layer, stats
        self.max_batch, self.max_queue = max_batch, max_queue
        self.device = next(model.parameters()).device
        self._waiting: deque[list[Row]] = deque()
        self._arrived = threading.Condition()
        self._last_arrival = 0.0
        self._batches: list[Batch] = []
        ends = getattr(model.generation_config, "eos_token_id", None)
        ends = ends if isinstance(ends, list) else [ends]
        self.end_ids = {int(e) for e in ends + [tokenizer.eos_token_id] if e is not None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.end_ids, default=0)

    @property
    def queued(self) -> int:
        return sum(len(rows) for rows in self._waiting)

    @property
    def running(self) -> int:
        return sum(len(b.rows) for b in self._batches)

    def submit(self, rows: list[Row]) -> None:
        """Admit one request's rows together, or refuse them all (``QueueFull``)."""
        with self._arrived:
            if self.queued + len(rows) > self.max_queue:
                rounds = 1 + self.queued // self.max_batch
                raise QueueFull(max(1, math.ceil(rounds * self.stats.typical_seconds())))
            self._waiting.append(rows)
            self._last_arrival = time.monotonic()
            self._arrived.notify()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            rows = self._take(stop, gather=not self._batches)
            if rows:
                self._admit(rows)
            for batch in list(self._batches):
                self._guarded(batch, self._step)
        with self._arrived:  # what is still waiting or running is told, not left hanging
            for rows in self._waiting:
                for row in rows:
                    row.fail("the server is shutting down")
            self._waiting.clear()
        for batch in self._batches:
            for row in batch.rows:
                row.fail("the server is shutting down")

    def _take(self, stop: threading.Event, gather: bool) -> list[Row]:
        """Waiting requests that fit beside the running rows (idle: wait for one, then gather)."""
        with self._arrived:
            if gather and not self._waiting:
                self._arrived.wait(timeout=0.1)
            if not self._waiting or stop.is_set():
                return []
            first = time.monotonic()
            while gather and self.queued < self.max_batch and time.monotonic() - first < GATHER_MOST:
                quiet = time.monotonic() - self._last_arrival
                if quiet >= GATHER_QUIET:
                    break
                self._arrived.wait(timeout=GATHER_QUIET - quiet)
            taken: list[Row] = []
            room = self.max_batch - self.running
            while self._waiting and len(taken) + len(self._waiting[0]) <= room:
                taken += self._waiting.popleft()
        for row in taken:
            if row.cancelled.is_set():
                row.stop_now("cancelled")
        return [row for row in taken if not row.done]

    def _admit(self, rows: list[Row]) -> None:
        """Prefill the new rows, take their first tokens, and join them to the running batch."""
        def start() -> Batch | None:
            for row in rows:
                row.start(self.device)
            with torch.no_grad():
                group, logits = Batch.prefill(self.model, self.layer, rows, self.pad_id)
            return self._tokens(group, logits)
        group = self._guarded_rows(rows, start)
        if group is None:
            return
        if not self._batches or not self._batches[0].join(group):
            self._batches.append(group)

    def _step(self, batch: Batch) -> Batch | None:
        with torch.no_grad():
            return self._tokens(batch, batch.step())

    def _tokens(self, batch: Batch, logits: torch.Tensor) -> Batch | None:
        """Every row takes its token; finished rows leave (None: none is left)."""
        tokens, names = choose(logits, batch.rows), batch.memories()
        for i, row in enumerate(batch.rows):
            if row.cancelled.is_set():
                row.stop_now("cancelled")
                continue
            if names is not None:
                row.memory = names[i]
            row.add(int(tokens[i]), self.end_ids)
        self.stats.step(len(batch.rows))
        for row in batch.rows:
            if row.done:
                self.stats.answered(row)
        batch.next = tokens[:, None]
        alive = [i for i, row in enumerate(batch.rows) if not row.done]
        if not alive:
            return None
        if len(alive) < len(batch.rows):
            batch.keep(torch.tensor(alive))
        return batch

    def _guarded(self, batch: Batch, fn: Callable[[Batch], Batch | None]) -> None:
        """Run one step of ``batch``; drop it when it ends or fails (its rows told why)."""
        result = self._guarded_rows(batch.rows, lambda: fn(batch))
        if result is None:
            self._batches.remove(batch)

    def _guarded_rows(self, rows: list[Row], fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # the rows that asked get the error; the worker goes on
            self.stats.error("generation")
            for row in rows:
                row.fail(f"generation failed: {type(exc).__name__}: {exc}")
            return None
