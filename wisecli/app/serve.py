"""``wise serve``: an OpenAI-compatible HTTP API over a (patched) model.

``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` (the model's chat template),
plain or streamed (server-sent events), on FastAPI.  Every prompt is routed on its own: the
side-memory layer decides per example from each request's own tokens.

All model calls run on one ``Worker``, on the main thread, one at a time: the layer keeps
per-call routing state, so concurrent requests queue rather than share a forward pass; and
PyTorch's CPU thread pool served a generation from another thread on one core only (1.15 s
against 0.72 s for 20 tokens of smollm2 on 2 cores).  The HTTP server runs in a thread
beside it.  A malformed request gets a 4xx JSON error in OpenAI's shape and the server goes
on serving.
"""
from __future__ import annotations

import json
import queue
import secrets
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from transformers import TextIteratorStreamer


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields we ignore (user, logit_bias, ...)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)


class CompletionRequest(_Request):
    prompt: str | list[str]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param


@dataclass
class Generated:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class Worker:
    """Runs submitted calls one at a time on the thread that calls ``run``."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()

    def submit(self, fn: Callable[[], Any]) -> Future:
        done: Future = Future()
        self._jobs.put((fn, done))
        return done

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                fn, done = self._jobs.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                done.set_result(fn())
            except BaseException as exc:  # the request that asked gets it, the worker goes on
                done.set_exception(exc)


class Engine:
    """The model and its tokenizer behind a worker: text in, text out, one request at a time."""

    def __init__(self, model: Any, tokenizer: Any, name: str, max_tokens_cap: int, worker: Worker) -> None:
        self.model, self.tok, self.name, self.cap, self.worker = model, tokenizer, name, max_tokens_cap, worker
        self.device = next(model.parameters()).device

    def chat_prompt(self, messages: list[Message]) -> str:
        if not getattr(self.tok, "chat_template", None):
            raise ApiError(400, f"{self.name} has no chat template; use /v1/completions", param="messages")
        return self.tok.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                            add_generation_prompt=True, tokenize=False)

    def _inputs(self, prompts: list[str], templated: bool) -> dict[str, torch.Tensor]:
        enc = self.tok(prompts, return_tensors="pt", padding=True, return_token_type_ids=False,
                       add_special_tokens=not templated)  # a chat template writes its own BOS
        return {k: v.to(self.device) for k, v in enc.items()}

    def _settings(self, req: _Request, limit: int | None) -> dict[str, Any]:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        sampled = req.temperature > 0
        return {"max_new_tokens": min(limit or 16, self.cap), "do_sample": sampled,
                **({"temperature": req.temperature, "top_p": req.top_p} if sampled else {}),
                **({"stop_strings": stop, "tokenizer": self.tok} if stop else {}),
                "pad_token_id": self.tok.pad_token_id}

    def generate(self, prompts: list[str], req: _Request, limit: int | None, templated: bool) -> list[Generated]:
        enc = self._inputs(prompts, templated)
        settings = self._settings(req, limit)

        def run() -> torch.Tensor:
            _seed(req)
            with torch.no_grad():
                return self.model.generate(**enc, **settings)
        out = self.worker.submit(run).result()
        new = out[:, enc["input_ids"].shape[1]:].tolist()
        stop, eos = settings.get("stop_strings", []), self.tok.eos_token_id
        results = []
        for ids, mask in zip(new, enc["attention_mask"]):
            saw_eos = eos in ids
            ids = ids[:ids.index(eos)] if saw_eos else ids  # what follows a finished row is padding
            text, reason = _finish(self.tok.decode(ids, skip_special_tokens=True), stop, len(ids),
                                   settings["max_new_tokens"], saw_eos)
            results.append(Generated(text, reason, int(mask.sum()), len(ids) + int(saw_eos)))
        return results

    def stream(self, prompt: str, req: _Request, limit: int | None, templated: bool) -> Iterator[str]:
        """Text pieces as the worker generates them."""
        enc = self._inputs([prompt], templated)
        settings = self._settings(req, limit)
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)

        def run() -> None:
            _seed(req)
            try:
                with torch.no_grad():
                    self.model.generate(**enc, **settings, streamer=streamer)
            except BaseException:
                streamer.end()  # the reader is not left waiting
                raise
        self.worker.submit(run)
        return _until_stop(streamer, settings.get("stop_strings", []))


def _seed(req: _Request) -> None:
    """Seeded on the worker, so that concurrent requests never reseed each other's draw."""
    if req.seed is not None:
        torch.manual_seed(req.seed)


def _finish(text: str, stop: list[str], n_tokens: int, limit: int, saw_eos: bool) -> tuple[str, str]:
    """Text cut at the first stop sequence, and OpenAI's finish_reason."""
    cuts = [text.index(s) for s in stop if s in text]
    if cuts:
        return text[:min(cuts)], "stop"
    return text, "length" if n_tokens >= limit and not saw_eos else "stop"


def _until_stop(pieces: Iterator[str], stop: list[str]) -> Iterator[str]:
    """Stream pieces, holding back what could be the start of a stop sequence."""
    held = ""
    for piece in pieces:
        held += piece
        cuts = [held.index(s) for s in stop if s in held]
        if cuts:
            if held[:min(cuts)]:
                yield held[:min(cuts)]
            for _ in pieces:  # let the generation finish (it stops on the same string)
                pass
            return
        keep = max((len(s) - 1 for s in stop), default=0)
        safe = held[:len(held) - keep] if keep else held
        if safe:
            yield safe
            held = held[len(safe):]
    if held:
        yield held


def _id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def _usage(results: list[Generated]) -> dict[str, int]:
    p, c = sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _sse(chunks: Iterator[dict]) -> Iterator[str]:
    for chunk in chunks:
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


# ---- the HTTP API ---------------------------------------------------------------------------

def create_app(engine: Engine) -> FastAPI:
    app = FastAPI(title="wise serve", docs_url=None, redoc_url=None)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0, "owned_by": "wise"}]}

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        _check_model(engine, req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts or req.stream and len(prompts) > 1:
            raise ApiError(400, "prompt must be one string when streaming, and not empty", param="prompt")
        if req.stream:
            pieces = engine.stream(prompts[0], req, req.max_tokens, templated=False)
            return _streamed(_id("cmpl"), engine.name, "text_completion", pieces, lambda t: {"text": t})
        results = engine.generate(prompts, req, req.max_tokens, templated=False)
        choices = [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
                   for i, r in enumerate(results)]
        return {"id": _id("cmpl"), "object": "text_completion", "created": int(time.time()),
                "model": engine.name, "choices": choices, "usage": _usage(results)}

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest):
        _check_model(engine, req.model)
        prompt, limit = engine.chat_prompt(req.messages), req.max_completion_tokens or req.max_tokens
        if req.stream:
            pieces = engine.stream(prompt, req, limit, templated=True)
            return _streamed(_id("chatcmpl"), engine.name, "chat.completion.chunk", pieces,
                             lambda t: {"delta": {"role": "assistant", "content": t}})
        (r,) = engine.generate([prompt], req, limit, templated=True)
        return {"id": _id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
                "model": engine.name, "usage": _usage([r]),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text},
                             "finish_reason": r.finish_reason}]}
    return app


def _check_model(engine: Engine, name: str) -> None:
    if name != engine.name:
        raise ApiError(404, f"the model '{name}' does not exist; this server serves '{engine.name}'",
                       kind="model_not_found", param="model")


def _streamed(cid: str, model: str, kind: str, pieces: Iterator[str], part) -> StreamingResponse:
    created = int(time.time())

    def chunks() -> Iterator[dict]:
        for text in pieces:
            yield {"id": cid, "object": kind, "created": created, "model": model,
                   "choices": [{"index": 0, **part(text), "finish_reason": None}]}
        end = {"delta": {}} if kind.startswith("chat") else {"text": ""}
        yield {"id": cid, "object": kind, "created": created, "model": model,
               "choices": [{"index": 0, **end, "finish_reason": "stop"}]}
    return StreamingResponse(_sse(chunks()), media_type="text/event-stream")


def _error_body(status: int, message: str, kind: str, param: str | None) -> JSONResponse:
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": kind, "param": param, "code": None}})


async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
    return _error_body(exc.status, str(exc), exc.kind, exc.param)


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    where = ".".join(loc)
    return _error_body(400, f"{where or 'body'}: {first.get('msg')}", "invalid_request_error",
                       loc[0] if loc else None)
