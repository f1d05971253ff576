"""The Starlette app: OpenAI-compatible routes over one :class:`ModelWorker`.

Every client mistake is an OpenAI-style JSON error (schema.ApiError), never a traceback.
A request is checked and turned into token ids before it queues, so a bad or too-long
prompt is refused at once; a full queue is a 429 before any byte of a stream is sent.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from moechat.app.serve.schema import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    Sampling,
    bad_request,
    parse_chat,
    parse_completion,
)
from moechat.app.serve.worker import Job, JobHandle, ModelWorker, Outcome
from moechat.runtime.errors import MoechatError
from moechat.runtime.model import LoadedModel
from moechat.runtime.sampling import SamplingParams

log = logging.getLogger("moechat.serve")

MAX_BODY_BYTES = 8 * 1024 * 1024
DISCONNECT_POLL_S = 0.2
Handler = Callable[[Request], Awaitable[Response]]


def error_response(err: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


class EventStream(StreamingResponse):
    """Server-sent events; the job stops when the response ends for any reason (a client
    that disconnects cancels the response: Starlette listens for ``http.disconnect``)."""

    def __init__(self, content: AsyncIterator[str], handle: JobHandle) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.handle = handle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.handle.cancel()


def _sse(data: dict[str, Any] | str) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n"


class Api:
    """Route handlers sharing the worker, the api key and the model's metadata."""

    def __init__(self, worker: ModelWorker, api_key: str | None) -> None:
        self.worker = worker
        self.api_key = api_key
        self.created = int(time.time())

    # -- plumbing -------------------------------------------------------------------
    def guarded(self, handler: Handler) -> Handler:
        """The api-key check, and ApiError as a JSON response."""

        async def run(request: Request) -> Response:
            try:
                self._authorize(request)
                return await handler(request)
            except ApiError as err:
                return error_response(err)

        return run

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            raise ApiError(
                401,
                "missing or invalid api key: send the header 'Authorization: Bearer KEY' "
                "with the key given to `moechat serve --api-key`",
                code="invalid_api_key",
            )

    @staticmethod
    async def _json(request: Request) -> Any:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as err:
            raise bad_request(f"the request body is not valid JSON: {err}") from None

    def _check_model(self, name: str | None) -> None:
        if name and name != self.worker.model_id:
            raise ApiError(
                404,
                f"model {name!r} not found: this server has {self.worker.model_id!r}",
                "not_found_error",
                "model",
                "model_not_found",
            )

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.worker.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "moechat",
        }

    # -- preparing a job (off the event loop: templates and tokenizers take a while) ---
    def _job(
        self, model: LoadedModel, ids: list[int], sampling: Sampling, param: str, chat: bool
    ) -> Job:
        if not ids:
            raise bad_request(f"the {param} is empty", param)
        limit = model.max_context
        if len(ids) >= limit:
            raise bad_request(
                f"the prompt is {len(ids)} tokens; this model's context holds {limit} tokens "
                "(prompt and reply together)",
                param,
                "context_length_exceeded",
            )
        room = min(limit - len(ids), int(SamplingParams.RANGES["max_new_tokens"].hi))
        max_tokens = min(sampling.max_tokens or room, room)
        try:
            params = sampling.params(model.defaults, max_tokens)
        except MoechatError as err:
            raise bad_request(str(err)) from None
        return Job(ids, params, remember_reply=chat)

    def _chat_job(self, req: ChatRequest) -> Job:
        model = self.worker.model
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        replies = self.worker.reply_ids(req.messages)
        try:
            ids = model.template.render_ids(messages, True, replies)
        except MoechatError as err:
            raise bad_request(str(err), "messages") from None
        return self._job(model, ids, req.sampling, "messages", chat=True)

    def _completion_job(self, req: CompletionRequest) -> Job:
        model = self.worker.model
        return self._job(
            model, model.tokenizer.encode_raw(req.prompt), req.sampling, "prompt", False
        )

    # -- routes ---------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        state = self.worker.state
        body: dict[str, Any] = {"status": "ok" if state == "ready" else state}
        if state == "failed":
            body["error"] = self.worker.error
        return JSONResponse(body, status_code=200 if state == "ready" else 503)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        self._check_model(name)
        return JSONResponse(self._model_card())

    async def chat_completions(self, request: Request) -> Response:
        req = parse_chat(await self._json(request))
        self._check_model(req.model)
        _ = self.worker.model  # a 503 while it loads, before any work
        job = await asyncio.to_thread(self._chat_job, req)
        handle = self.worker.submit(job)
        ident, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": ident, "created": created, "model": self.worker.model_id}
        if req.stream:
            return EventStream(self._chat_stream(handle, head, req.include_usage), handle)
        outcome = await _collect(handle, request)
        message = {"role": "assistant", "content": outcome.text}
        return JSONResponse({
            **head, "object": "chat.completion", "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": outcome.finish_reason}],
            "usage": outcome.usage(),
        })  # fmt: skip

    async def _chat_stream(
        self, handle: JobHandle, head: dict[str, Any], include_usage: bool
    ) -> AsyncIterator[str]:
        head = {**head, "object": "chat.completion.chunk", "system_fingerprint": None}
        extra: dict[str, Any] = {"usage": None} if include_usage else {}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return _sse({**head, "choices": [choice], **extra})

        yield chunk({"role": "assistant", "content": ""})
        async for text in _stream_items(handle):
            if isinstance(text, str):
                yield chunk({"content": text})
            elif isinstance(text, ApiError):
                yield _sse(text.body())
            else:
                yield chunk({}, text.finish_reason)
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": text.usage()})
        yield _sse("[DONE]")

    async def completions(self, request: Request) -> Response:
        req = parse_completion(await self._json(request))
        self._check_model(req.model)
        _ = self.worker.model
        job = await asyncio.to_thread(self._completion_job, req)
        handle = self.worker.submit(job)
        ident, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": ident, "object": "text_completion", "created": created,
                "model": self.worker.model_id, "system_fingerprint": None}  # fmt: skip
        if req.stream:
            return EventStream(self._completion_stream(handle, head, req.include_usage), handle)
        outcome = await _collect(handle, request)
        choice = {"index": 0, "text": outcome.text, "logprobs": None,
                  "finish_reason": outcome.finish_reason}  # fmt: skip
        return JSONResponse({**head, "choices": [choice], "usage": outcome.usage()})

    async def _completion_stream(
        self, handle: JobHandle, head: dict[str, Any], include_usage: bool
    ) -> AsyncIterator[str]:
        extra: dict[str, Any] = {"usage": None} if include_usage else {}

        def chunk(text: str, finish: str | None = None) -> str:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            return _sse({**head, "choices": [choice], **extra})

        async for item in _stream_items(handle):
            if isinstance(item, str):
                yield chunk(item)
            elif isinstance(item, ApiError):
                yield _sse(item.body())
            else:
                yield chunk("", item.finish_reason)
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": item.usage()})
        yield _sse("[DONE]")


STOPPED = "the generation was stopped: the server is shutting down"


async def _stream_items(handle: JobHandle) -> AsyncIterator[str | Outcome | ApiError]:
    """The job's events, with an error as a last item instead of an exception (a job
    cancelled while its client is still there: the server is stopping)."""
    try:
        async for item in handle.events():
            if isinstance(item, Outcome) and item.cancelled:
                yield ApiError(503, STOPPED, "service_unavailable")
            else:
                yield item
    except ApiError as err:
        yield err


async def _collect(handle: JobHandle, request: Request) -> Outcome:
    """The outcome of a non-streamed job; a client that disconnects cancels it."""

    async def watch() -> None:
        while not handle.finished:
            await asyncio.sleep(DISCONNECT_POLL_S)
            if await request.is_disconnected():
                log.info("client disconnected: generation stopped")
                handle.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        async for item in handle.events():
            if isinstance(item, Outcome):
                if item.cancelled:  # the client is gone (nobody reads this) or we stop
                    raise ApiError(503, STOPPED, "service_unavailable")
                return item
        raise ApiError(500, "the generation ended without a result", "server_error")
    finally:
        watcher.cancel()


async def _not_found(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    if status == 404:
        message, kind = f"no route {request.method} {request.url.path}", "not_found_error"
    elif status == 405:
        message, kind = (
            f"method {request.method} is not allowed on {request.url.path}",
            "invalid_request_error",
        )
    else:
        message, kind = str(getattr(exc, "detail", "")) or "error", "invalid_request_error"
    return error_response(ApiError(status, message, kind))  # type: ignore[arg-type]


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(ApiError(500, f"internal error: {type(exc).__name__}", "server_error"))


def create_app(worker: ModelWorker, api_key: str | None = None) -> Starlette:
    """The ASGI app. /health needs no key (for probes); everything under /v1 does."""
    api = Api(worker, api_key)
    g = api.guarded
    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route("/v1/models", g(api.models), methods=["GET"]),
        Route("/v1/models/{model:path}", g(api.model), methods=["GET"]),
        Route("/v1/chat/completions", g(api.chat_completions), methods=["POST"]),
        Route("/v1/completions", g(api.completions), methods=["POST"]),
    ]
    handlers = {HTTPException: _not_found, Exception: _server_error}
    return Starlette(routes=routes, exception_handlers=handlers)
