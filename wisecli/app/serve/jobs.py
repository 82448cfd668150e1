"""One HTTP request's life on the server: its rows admitted, awaited, and always closed.

A ``Job`` turns a validated request into rows for the worker and waits for them on the
event loop: until they end, until ``timeout`` runs out (504, the rows cancelled), or until
its client leaves (the rows cancelled, so the batch stops spending steps on them).  Whatever
happens, ``close`` counts the outcome once and cancels what is still running.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

from fastapi import Request

from wisecli.app.serve.batcher import Batcher, QueueFull
from wisecli.app.serve.rows import Generated, Row, Sampling
from wisecli.app.serve.schema import ApiError, Message, RequestBase
from wisecli.app.serve.stats import Stats

DEFAULT_TOKENS = 16  # OpenAI's default max_tokens for completions


class Engine:
    """The served model as requests see it: its name, limits, tokenizer and worker."""

    def __init__(self, batcher: Batcher, name: str, max_tokens_cap: int, timeout: float, stats: Stats) -> None:
        self.batcher, self.tok, self.name = batcher, batcher.tok, name
        self.cap, self.timeout, self.stats = max_tokens_cap, timeout, stats
        config = batcher.model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.context = getattr(config, "max_position_embeddings", None)

    def chat_prompt(self, messages: list[Message]) -> str:
        if not getattr(self.tok, "chat_template", None):
            raise ApiError(400, f"{self.name} has no chat template; use /v1/completions", param="messages")
        return self.tok.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                            add_generation_prompt=True, tokenize=False)

    def job(self, endpoint: str, prompts: list[str], req: RequestBase, limit: int | None, templated: bool) -> "Job":
        most = min(self.batcher.max_batch, self.batcher.max_queue)  # more could never be admitted
        if len(prompts) > most:
            raise ApiError(400, f"at most {most} prompts per request", param="prompt")
        sampling = Sampling(min(limit or DEFAULT_TOKENS, self.cap), req.temperature, req.top_p, req.seed, req.stops)
        ids = [self.tok(p, add_special_tokens=not templated)["input_ids"] for p in prompts]  # a template writes its BOS
        for one in ids:
            if not one:
                raise ApiError(400, "the prompt is empty", param="prompt")
            if self.context is not None and len(one) + sampling.max_tokens > self.context:
                raise ApiError(400, f"the prompt ({len(one)} tokens) and max_tokens ({sampling.max_tokens}) exceed "
                                    f"the model's context of {self.context} tokens", param="max_tokens")
        return Job(self, endpoint, ids, sampling, streamed=bool(req.stream))


class Outbox:
    """Where one row's events land: filled on the worker thread, read on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, streamed: bool) -> None:
        self.loop, self.streamed, self.queue = loop, streamed, asyncio.Queue()

    def put(self, kind: str, value: Any) -> None:
        if kind == "text" and not self.streamed:
            return  # a whole answer comes with its end
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))
        except RuntimeError:  # the loop has closed: the server is stopping
            pass


class Job:
    def __init__(self, engine: Engine, endpoint: str, ids: list[list[int]], sampling: Sampling, streamed: bool) -> None:
        self.engine, self.endpoint = engine, endpoint
        loop = asyncio.get_running_loop()
        self.boxes = [Outbox(loop, streamed) for _ in ids]
        self.rows = [Row(one, sampling, engine.tok, box.put) for one, box in zip(ids, self.boxes)]
        self.deadline = time.monotonic() + engine.timeout
        self.outcome = "disconnected"
        self._closed = False

    def admit(self) -> None:
        try:
            self.engine.batcher.submit(self.rows)
        except QueueFull as full:
            self.close("rejected")
            raise ApiError(503, str(full), kind="server_busy", headers={"Retry-After": str(full.retry_after)})

    async def results(self, request: Request) -> list[Generated]:
        """Every row's result, in order (504 past the deadline; a client gone cancels them)."""
        watch = asyncio.ensure_future(_gone(request))
        try:
            out = []
            for box in self.boxes:
                kind, value = await self._next(box, watch)
                if kind == "error":
                    self.outcome = "error"
                    raise ApiError(500, value, kind="server_error")
                out.append(value)
            self.outcome = "ok"
            return out
        finally:
            watch.cancel()
            self.close(self.outcome)

    async def events(self) -> AsyncIterator[tuple[str, Any]]:
        """Row 0's events as they come: ("text", piece) ..., then ("end", Generated) or
        ("error", message); the generator's close (a client gone) cancels the row."""
        try:
            while True:
                kind, value = await self._next(self.boxes[0], None)
                yield kind, value
                if kind != "text":
                    self.outcome = "ok" if kind == "end" else "error"
                    return
        except ApiError as exc:  # past the deadline
            yield "error", str(exc)
        finally:
            self.close(self.outcome)

    async def _next(self, box: Outbox, watch: asyncio.Future | None) -> tuple[str, Any]:
        get = asyncio.ensure_future(box.queue.get())
        waits = {get} if watch is None else {get, watch}
        done, _ = await asyncio.wait(waits, timeout=max(0.0, self.deadline - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        if watch is not None and watch in done:
            raise Gone()
        self.outcome = "timeout"
        raise ApiError(504, f"the request took longer than the server's timeout of {self.engine.timeout:g} s",
                       kind="timeout")

    def close(self, outcome: str) -> None:
        if not self._closed:
            self._closed = True
            for row in self.rows:
                row.cancel()  # no effect on a finished row
            self.engine.stats.request(self.endpoint, outcome)


class Gone(Exception):
    """The client closed its connection: there is no one to answer."""


async def _gone(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)
