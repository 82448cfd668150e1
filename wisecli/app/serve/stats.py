"""What ``/metrics`` reports, in Prometheus' text format, for the lifetime of one server.

Names follow the conventions vLLM and TGI use (``*_total`` counters, ``*_seconds``
histograms, labels for the endpoint and the outcome), so an existing dashboard needs only
the prefix changed.  Updated by the HTTP threads and the worker, under one lock.
"""
from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections import Counter, deque
from typing import Iterable

from wisecli.app.serve.rows import Row

RATE_WINDOW = 10.0  # seconds over which tokens per second is averaged
SECONDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ROWS = (1, 2, 4, 8, 16, 32, 64, 128)


class Histogram:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds, self.counts, self.sum, self.n = bounds, [0] * len(bounds), 0.0, 0

    def observe(self, value: float) -> None:
        i = bisect_left(self.bounds, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += value
        self.n += 1

    def lines(self, name: str) -> Iterable[str]:
        running = 0
        for bound, count in zip(self.bounds, self.counts):
            running += count
            yield f'{name}_bucket{{le="{bound:g}"}} {running}'
        yield f'{name}_bucket{{le="+Inf"}} {self.n}'
        yield f"{name}_sum {self.sum:.6f}"
        yield f"{name}_count {self.n}"


class Stats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, str]] = Counter()
        self.errors: Counter[str] = Counter()
        self.memories: Counter[str] = Counter()
        self.prompt_tokens = self.generation_tokens = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last RATE_WINDOW seconds
        self.batch_rows, self.duration, self.first_token = Histogram(ROWS), Histogram(SECONDS), Histogram(SECONDS)

    def request(self, endpoint: str, outcome: str) -> None:
        with self._lock:
            self.requests[(endpoint, outcome)] += 1

    def error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] += 1

    def step(self, rows: int) -> None:
        """One decode step (or prefill) of ``rows`` rows: one token each."""
        now = time.monotonic()
        with self._lock:
            self.batch_rows.observe(rows)
            self.generation_tokens += rows
            self._recent.append((now, rows))
            while self._recent and now - self._recent[0][0] > RATE_WINDOW:
                self._recent.popleft()

    def answered(self, row: Row) -> None:
        """A finished row: its timings and which memory answered (cancelled rows are not)."""
        if row.result is None or row.result.finish_reason in ("cancelled", "error"):
            return
        with self._lock:
            self.memories[row.result.memory] += 1
            self.prompt_tokens += len(row.prompt_ids)
            self.duration.observe(row.finished_at - row.admitted)
            if row.first_token_at is not None:
                self.first_token.observe(row.first_token_at - row.admitted)

    def typical_seconds(self) -> float:
        """A request's mean duration so far (1 s before any), for a Retry-After estimate."""
        with self._lock:
            return self.duration.sum / self.duration.n if self.duration.n else 1.0

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            recent = [n for t, n in self._recent if now - t <= RATE_WINDOW]
        return sum(recent) / RATE_WINDOW

    def render(self, queued: int, running: int) -> str:
        """The text /metrics answers; the queue's gauges are read by the caller, from the worker."""
        rate = self.tokens_per_second()
        with self._lock:
            out = [*_family("wise_requests_total", "counter", "Requests answered, by endpoint and outcome.",
                            {f'endpoint="{e}",outcome="{o}"': n for (e, o), n in sorted(self.requests.items())}),
                   *_family("wise_errors_total", "counter", "Errors, by kind.",
                            {f'kind="{k}"': n for k, n in sorted(self.errors.items())}),
                   *_family("wise_queue_rows", "gauge", "Rows waiting for a batch.", {"": queued}),
                   *_family("wise_running_rows", "gauge", "Rows in the running batch.", {"": running}),
                   *_family("wise_prompt_tokens_total", "counter", "Prompt tokens read.", {"": self.prompt_tokens}),
                   *_family("wise_generation_tokens_total", "counter", "Tokens generated.",
                            {"": self.generation_tokens}),
                   *_family("wise_generation_tokens_per_second", "gauge",
                            f"Tokens generated per second over the last {RATE_WINDOW:g} s, all rows together.",
                            {"": round(rate, 3)}),
                   *_family("wise_memory_answers_total", "counter",
                            "Answered rows, by the memory that answered (main: none).",
                            {f'memory="{m}"': n for m, n in sorted(self.memories.items())})]
            for name, text, hist in (("wise_batch_rows", "Rows per decode step.", self.batch_rows),
                                     ("wise_request_duration_seconds", "Admission to last token, per row.",
                                      self.duration),
                                     ("wise_time_to_first_token_seconds", "Admission to first token, per row.",
                                      self.first_token)):
                out += [f"# HELP {name} {text}", f"# TYPE {name} histogram", *hist.lines(name)]
        return "\n".join(out) + "\n"


def _family(name: str, kind: str, text: str, samples: dict[str, float]) -> list[str]:
    lines = [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
    return lines + [f"{name}{{{labels}}} {value}" if labels else f"{name} {value}" for labels, value in samples.items()]
