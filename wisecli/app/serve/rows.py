"""One prompt's generation inside a served batch: what it asked for, what it has written.

A ``Row`` lives from the moment its request is admitted until its last piece of text is
handed out.  The batcher feeds it one token per decode step; the row decides, on its own,
whether it is finished (its end-of-sequence token, a stop string, its own ``max_tokens``, or
its client gone), so rows of one batch never wait on each other's settings.  What it writes
goes to a ``sink``: the HTTP side's queue, read by an event loop on another thread.
"""
from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

Sink = Callable[[str, Any], None]  # ("text", str) pieces, then ("end", Generated) or ("error", str)


@dataclass(frozen=True)
class Sampling:
    """A request's own decoding settings (OpenAI's names)."""
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Generated:
    text: str
    finish_reason: str           # "stop", "length", "cancelled"
    prompt_tokens: int
    completion_tokens: int
    memory: str = "main"         # which memory answered ("main": none)


class Row:
    """One prompt being generated: its tokens, its text so far, and how much has been sent."""

    def __init__(self, prompt_ids: list[int], sampling: Sampling, tokenizer: Any, sink: Sink) -> None:
        self.prompt_ids, self.sampling, self.tok, self.sink = prompt_ids, sampling, tokenizer, sink
        self.tokens: list[int] = []
        self.sent = 0                        # characters of the text already handed out
        self.result: Generated | None = None
        self.cancelled = threading.Event()   # its client left or its time ran out
        self.admitted = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at = 0.0
        self.generator: torch.Generator | None = None
        self.memory = "main"                 # which memory answered, as the batcher last saw it
        self._hold = max((len(s) - 1 for s in sampling.stop), default=0)

    @property
    def done(self) -> bool:
        return self.result is not None

    def cancel(self) -> None:
        self.cancelled.set()

    def start(self, device: torch.device) -> None:
        """Seeded when its batch starts: a row's draws depend on its own seed only, never on
        which requests share its batch."""
        if self.sampling.temperature > 0:
            seed = self.sampling.seed if self.sampling.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator(device=device).manual_seed(seed)

    def add(self, token: int, end_ids: set[int]) -> None:
        """Take the token this step chose for the row, and hand out what is now certain."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if token in end_ids:
            self._send(self._text(), final=True)
            self._finish("stop", eos=True)
            return
        self.tokens.append(token)
        text = self._text()
        cuts = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.sampling.stop) if i >= 0]
        if cuts:
            self._send(text[:min(cuts)], final=True)
            self._finish("stop")
        elif len(self.tokens) >= self.sampling.max_tokens:
            self._send(text, final=True)
            self._finish("length")
        else:
            self._send(text[:len(text) - self._hold] if self._hold else text)

    def stop_now(self, reason: str) -> None:
        """Finished from outside: the batch ended (what was held back goes out) or was cancelled."""
        if not self.done:
            if reason != "cancelled":
                self._send(self._text(), final=True)
            self._finish(reason)

    def fail(self, message: str) -> None:
        if not self.done:
            self.result = Generated("", "error", len(self.prompt_ids), len(self.tokens))
            self.sink("error", message)

    def _text(self) -> str:
        return self.tok.decode(self.tokens, skip_special_tokens=True)

    def _send(self, text: str, final: bool = False) -> None:
        if not final:
            text = text.rstrip("\ufffd")  # an incomplete UTF-8 character waits for its next byte
        if len(text) > self.sent:
            self.sink("text", text[self.sent:])
            self.sent = len(text)

    def _finish(self, reason: str, eos: bool = False) -> None:
        self.finished_at = time.monotonic()
        text = self._text()
        cuts = [text.find(s) for s in self.sampling.stop if s in text]
        self.result = Generated(text[:min(cuts)] if cuts else text, reason, len(self.prompt_ids),
                                len(self.tokens) + int(eos), self.memory)
        self.sink("end", self.result)
