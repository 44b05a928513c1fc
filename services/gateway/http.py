"""The gateway's OpenAI-compatible HTTP door: Starlette on uvicorn, in the gateway's loop.

  POST /v1/chat/completions, /v1/completions   (SSE with ``stream: true``)
  GET  /v1/models, /health (alive), /ready (workers registered), /metrics (Prometheus)

A request becomes the GenerateRequest the gRPC door would get (openai_schema.py) and
runs through ``GenerationServicer.stream``: the same validation, admission, routing and
cleanup as gRPC, not a second implementation. Errors before the first token are OpenAI
error JSON with the matching status (400, 401, 404, 429, 503, 504); after the stream
started they arrive as a ``data: {"error": ...}`` event before ``data: [DONE]``.

Every response runs under a disconnect watch: when the client goes away (``http.
disconnect``), the request's task is cancelled at once, wherever it is (waiting in the
forwarding queue, in prefill, decoding), which cancels its downstream calls and frees
its KV exactly as a gRPC cancel does. Starlette's StreamingResponse only notices a gone
client at its next write, which could be a long queue wait away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
import uvicorn
from opentelemetry import context as otel_context
from opentelemetry.propagate import extract
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from pdserve.v1 import generation_service_pb2 as pb
from services.common.auth import bearer_ok
from services.common.errors import InvalidArgument, PdserveError
from services.gateway.openai_schema import (
    Answer,
    ChatCompletionRequest,
    CompletionRequest,
    build_request,
    error_body,
    parse,
)
from services.gateway.servicer import GenerationServicer

log = logging.getLogger(__name__)
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
               (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
DONE = b"data: [DONE]\n\n"
Produce = Callable[[Send], Coroutine[Any, Any, None]]


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _event(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


async def _send_json(send: Send, status: int, obj: Any, rid: str = "") -> None:
    body = _dumps(obj)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if rid:
        headers.append((b"x-request-id", rid.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def error_response(err: PdserveError) -> JSONResponse:
    status, body = error_body(err)
    headers = {"www-authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


class Guarded(Response):
    """Runs ``produce(send)`` and cancels it as soon as the client disconnects."""

    def __init__(self, produce: Produce) -> None:
        self.produce = produce
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def gone() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        work = asyncio.create_task(self.produce(send))
        watch = asyncio.create_task(gone())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()  # the client left: cancel the request everywhere
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await work  # OSError: the client left during a write


class HttpDoor:
    def __init__(self, servicer: GenerationServicer, api_keys: tuple[str, ...] = ()) -> None:
        self.servicer = servicer
        self.api_keys = api_keys
        self.model = servicer.info.name
        self.started = int(time.time())
        self.server: uvicorn.Server | None = None
        self._main: asyncio.Task[None] | None = None
        self.port = 0
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/ready", self.ready, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ])

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self, host: str, port: int, *, tls_cert: str = "", tls_key: str = "",
                    tls_client_ca: str = "", grace_s: float = 5.0) -> int:
        config = uvicorn.Config(
            self.app, host=host, port=port, lifespan="off", log_level="warning",
            access_log=False, timeout_graceful_shutdown=max(1, int(grace_s)),
            ssl_certfile=tls_cert or None, ssl_keyfile=tls_key or None,
            ssl_ca_certs=tls_client_ca or None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls_client_ca else ssl.CERT_NONE)
        config.load()
        server = uvicorn.Server(config)
        # Server.serve() would install its own SIGINT/SIGTERM handlers over the gateway's;
        # its parts run here instead, and the gateway's stop() shuts it down.
        server.lifespan = config.lifespan_class(config)
        await server.startup()
        if not server.started:
            raise RuntimeError(f"could not bind HTTP on {host}:{port}")
        self.server = server
        self.port = int(server.servers[0].sockets[0].getsockname()[1])
        self._main = asyncio.get_running_loop().create_task(server.main_loop())
        return self.port

    async def stop(self) -> None:
        if self.server is None:
            return
        self.server.should_exit = True
        if self._main is not None:
            await self._main
        await self.server.shutdown()

    # --- endpoints -----------------------------------------------------------------------
    def _denied(self, request: Request) -> Response | None:
        if bearer_ok(request.headers.get("authorization"), self.api_keys):
            return None
        why = "invalid API key" if request.headers.get("authorization") else \
            "missing API key: send the header 'Authorization: Bearer <key>'"
        return error_response(PdserveError(why, reason="UNAUTHENTICATED",
                                           code=grpc.StatusCode.UNAUTHENTICATED))

    async def models(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        return JSONResponse({"object": "list", "data": [{
            "id": self.model, "object": "model", "created": self.started, "owned_by": "pdserve",
            "max_model_len": self.servicer.info.max_context}]})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        group = self.servicer.default_group
        view = self.servicer.view
        missing = [r for r in ("prefill", "decode") if not view.instances(role=r, group=group)]
        if missing:
            return JSONResponse({"status": "not ready", "group": group,
                                 "missing": missing}, status_code=503)
        return JSONResponse({"status": "ready", "group": group})

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    async def chat(self, request: Request) -> Response:
        return await self._handle(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._handle(request, chat=False)

    async def _handle(self, request: Request, chat: bool) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        try:
            try:
                body = await request.json()
            except (ValueError, UnicodeDecodeError):
                raise InvalidArgument("the body is not valid JSON") from None
            r = parse(ChatCompletionRequest if chat else CompletionRequest, body)
            ids = None
            if isinstance(r, ChatCompletionRequest):
                try:
                    ids = self.servicer.tok.encode_messages(
                        [{"role": m.role, "content": m.text()} for m in r.messages])
                except ValueError as e:  # the template refused the conversation
                    raise InvalidArgument(f"messages: {e}", metadata={"param": "messages"}) \
                        from None
            greq = build_request(r, request.headers, ids)
        except PdserveError as e:
            return error_response(e)
        include_usage = bool(r.stream_options and r.stream_options.include_usage)
        trace_ctx = extract(dict(request.headers))
        if r.stream:
            return Guarded(lambda send: self._stream(send, greq, chat, include_usage, trace_ctx))
        return Guarded(lambda send: self._complete(send, greq, chat, trace_ctx))

    # --- producers (run under Guarded) ---------------------------------------------------
    async def _complete(self, send: Send, greq: pb.GenerateRequest, chat: bool,
                        trace_ctx: otel_context.Context) -> None:
        otel_context.attach(trace_ctx)  # this task's own context: the caller's trace, if any
        answer = Answer(chat, self.model)
        try:
            async with contextlib.aclosing(self.servicer.stream(greq, None)) as it:
                async for msg in it:
                    answer.add(msg)
        except PdserveError as e:
            status, body = error_body(e)
            await _send_json(send, status, body, e.metadata.get("request_id", ""))
            return
        await _send_json(send, 200, answer.full(), answer.request_id)

    async def _stream(self, send: Send, greq: pb.GenerateRequest, chat: bool,
                      include_usage: bool, trace_ctx: otel_context.Context) -> None:
        otel_context.attach(trace_ctx)
        answer = Answer(chat, self.model)
        async with contextlib.aclosing(self.servicer.stream(greq, None)) as it:
            try:
                first = await anext(it)
            except PdserveError as e:  # before any token: a proper status code
                status, body = error_body(e)
                await _send_json(send, status, body, e.metadata.get("request_id", ""))
                return
            text = answer.add(first)
            headers = [*SSE_HEADERS, (b"x-request-id", answer.request_id.encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})

            async def emit(data: bytes, more: bool = True) -> None:
                await send({"type": "http.response.body", "body": data, "more_body": more})

            await emit(_event(answer.chunk(text, None, include_usage, first=True)))
            try:
                async for msg in it:
                    text = answer.add(msg)
                    if text:
                        await emit(_event(answer.chunk(text, None, include_usage)))
                await emit(_event(answer.chunk("", answer.finish or "stop", include_usage)))
                if include_usage:
                    await emit(_event(answer.usage_chunk()))
            except PdserveError as e:  # mid-stream: the status line is gone, say it in-band
                await emit(_event(error_body(e)[1]))
            await emit(DONE, more=False)
