"""The public door's security: API keys (``Authorization: Bearer <key>``) and TLS.

One check serves both doors: ``ApiKeyInterceptor`` for gRPC (metadata
``authorization``) and ``bearer_ok`` for HTTP (the header). Keys are compared in
constant time. grpc.health.v1 stays open, so orchestrators can probe a keyed gateway.
``server_credentials`` builds the gRPC TLS credentials from PEM files; a client CA turns
on mutual TLS (clients must present a certificate it signed).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
AUTH_HEADER = "authorization"


def parse_keys(raw: str) -> tuple[str, ...]:
    """Comma-separated keys (several let operators rotate one at a time)."""
    return tuple(k.strip() for k in raw.split(",") if k.strip())


def bearer_ok(header: str | None, keys: Sequence[str]) -> bool:
    """True when ``header`` is ``Bearer <k>`` for one of ``keys`` (none configured: open)."""
    if not keys:
        return True
    if not header:
        return False
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    token_b = token.strip().encode()
    # Compare against every key, so timing does not reveal which prefix matched.
    return any([hmac.compare_digest(token_b, k.encode()) for k in keys])


def _abort_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover  (makes this an async generator)

    kw = dict(request_deserializer=handler.request_deserializer,
              response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kw)
    return grpc.unary_unary_rpc_method_handler(deny, **kw)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for a call without ``authorization: Bearer <key>`` (one of ``keys``)."""

    def __init__(self, keys: Sequence[str],
                 open_prefixes: Sequence[str] = OPEN_METHOD_PREFIXES) -> None:
        self.keys = tuple(keys)
        self.open_prefixes = tuple(open_prefixes)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method or ""
        if method.startswith(self.open_prefixes):
            return await continuation(handler_call_details)
        header = next((str(v) for k, v in handler_call_details.invocation_metadata or ()
                       if k == AUTH_HEADER), None)
        handler = await continuation(handler_call_details)
        if bearer_ok(header, self.keys) or handler is None:
            return handler
        why = ("missing API key: send metadata 'authorization: Bearer <key>'" if not header
               else "invalid API key")
        return _abort_handler(handler, why)


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials:
    """TLS for a gRPC server from PEM files; ``client_ca`` requires client certificates."""
    pair = [(Path(key).read_bytes(), Path(cert).read_bytes())]
    if client_ca:
        return grpc.ssl_server_credentials(pair, root_certificates=Path(client_ca).read_bytes(),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials(pair)
