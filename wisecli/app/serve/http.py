"""The HTTP API: OpenAI's endpoints over the batching worker, plus /health and /metrics.

Handlers run on the event loop and never touch the model: they validate, tokenize, admit a
``Job`` and await its rows.  A malformed request gets a 4xx JSON error in OpenAI's shape, a
full queue a 503 with ``Retry-After``, and the server goes on serving.
"""
from __future__ import annotations

import json
import secrets
import time
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from wisecli.app.serve.jobs import Engine, Gone, Job
from wisecli.app.serve.rows import Generated
from wisecli.app.serve.schema import ApiError, ChatRequest, CompletionRequest, error_body


def create_app(engine: Engine) -> FastAPI:
    app = FastAPI(title="wise serve", docs_url=None, redoc_url=None)
    _handlers(app, engine)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "queued_rows": engine.batcher.queued, "running_rows": engine.batcher.running}

    @app.get("/metrics")
    def metrics() -> Response:
        return PlainTextResponse(engine.stats.render(engine.batcher.queued, engine.batcher.running), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0, "owned_by": "wise"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        _check_model(engine, req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts or req.stream and len(prompts) > 1:
            raise ApiError(400, "prompt must be one string when streaming, and not empty", param="prompt")
        job = engine.job("completions", prompts, req, req.max_tokens, templated=False)
        job.admit()
        if req.stream:
            return _streamed(job, "text_completion", lambda t: {"text": t})
        results = await job.results(request)
        choices = [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
                   for i, r in enumerate(results)]
        return {"id": _id("cmpl"), "object": "text_completion", "created": int(time.time()),
                "model": engine.name, "choices": choices, "usage": _usage(results)}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        _check_model(engine, req.model)
        job = engine.job("chat", [engine.chat_prompt(req.messages)], req,
                         req.max_completion_tokens or req.max_tokens, templated=True)
        job.admit()
        if req.stream:
            return _streamed(job, "chat.completion.chunk", lambda t: {"delta": {"role": "assistant", "content": t}})
        (r,) = await job.results(request)
        return {"id": _id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
                "model": engine.name, "usage": _usage([r]),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text},
                             "finish_reason": r.finish_reason}]}
    return app


def _handlers(app: FastAPI, engine: Engine) -> None:
    """Errors in OpenAI's shape, each counted in /metrics under its endpoint."""
    def endpoint(request: Request) -> str:
        return "chat" if request.url.path.endswith("chat/completions") else \
            "completions" if request.url.path.endswith("/completions") else request.url.path

    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        if exc.status < 500:  # a job counts its own 5xx outcomes
            engine.stats.request(endpoint(request), "invalid")
        return exc.response()

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        engine.stats.request(endpoint(request), "invalid")
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        return error_body(400, f"{'.'.join(loc) or 'body'}: {first.get('msg')}", "invalid_request_error",
                          loc[0] if loc else None)

    async def gone(_request: Request, _exc: Gone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Gone, gone)


def _check_model(engine: Engine, name: str) -> None:
    if name != engine.name:
        raise ApiError(404, f"the model '{name}' does not exist; this server serves '{engine.name}'",
                       kind="model_not_found", param="model")


def _id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def _usage(results: list[Generated]) -> dict[str, int]:
    p, c = sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _streamed(job: Job, kind: str, part: Callable[[str], dict]) -> StreamingResponse:
    """Server-sent events: a chunk per piece of text, the finish reason, then [DONE]."""
    cid, created, model = _id("chatcmpl" if kind.startswith("chat") else "cmpl"), int(time.time()), job.engine.name

    def chunk(choice: dict) -> str:
        body = {"id": cid, "object": kind, "created": created, "model": model, "choices": [{"index": 0, **choice}]}
        return f"data: {json.dumps(body)}\n\n"

    async def sse() -> AsyncIterator[str]:
        async for event, value in job.events():
            if event == "text":
                yield chunk({**part(value), "finish_reason": None})
            elif event == "end":
                end = {"delta": {}} if kind.startswith("chat") else {"text": ""}
                yield chunk({**end, "finish_reason": value.finish_reason})
            else:
                yield f"data: {json.dumps({'error': {'message': value, 'type': 'server_error'}})}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(sse(), media_type="text/event-stream")
