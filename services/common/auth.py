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
CLUSTER_TOKEN_HEADER = "x-pdserve-cluster-token"
# Internal services leave probes and read-only stats open (orchestrators, pdserve status,
# benches); everything that reserves, moves or computes needs the cluster token.
INTERNAL_OPEN_PREFIXES = (
    "/grpc.health.v1.Health/", "/grpc.reflection.",
    "/pdserve.v1.KvStoreService/GetKvStoreStats", "/pdserve.v1.PrefillService/GetPrefillStats",
    "/pdserve.v1.DecodeService/GetDecodeStats",
    "/pdserve.v1.WorkerControlService/GetWorkerStatus", "/pdserve.v1.AdminService/ListGroups")


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
                       if k == self.header), None)
        handler = await continuation(handler_call_details)
        if self.accepts(header) or handler is None:
            return handler
        return _abort_handler(handler, self.refusal(header))

    header = AUTH_HEADER

    def accepts(self, header: str | None) -> bool:
        return bearer_ok(header, self.keys)

    @staticmethod
    def refusal(header: str | None) -> str:
        return ("missing API key: send metadata 'authorization: Bearer <key>'" if not header
                else "invalid API key")


class ClusterTokenInterceptor(ApiKeyInterceptor):
    """UNAUTHENTICATED for an internal call without the shared cluster token (metadata
    ``x-pdserve-cluster-token``); ``new_channel`` adds it to every call this process makes."""

    header = CLUSTER_TOKEN_HEADER

    def __init__(self, token: str, open_prefixes: Sequence[str] = INTERNAL_OPEN_PREFIXES) -> None:
        super().__init__((token,), open_prefixes)

    def accepts(self, header: str | None) -> bool:
        return token_ok(header, self.keys)

    @staticmethod
    def refusal(header: str | None) -> str:
        return ("missing cluster token: internal pdserve services only answer callers with "
                "the cluster's PDSERVE_CLUSTER_TOKEN" if not header else "invalid cluster token")


def token_ok(value: str | None, tokens: Sequence[str]) -> bool:
    """Constant-time check of a raw token (bytes: safe for any non-ASCII input)."""
    if not tokens:
        return True
    if not value:
        return False
    raw = value.encode()
    return any([hmac.compare_digest(raw, t.encode()) for t in tokens])


class _TokenMetadata:
    """Adds one metadata pair (the cluster token by default) to every call of a channel."""

    def __init__(self, token: str, header: str = CLUSTER_TOKEN_HEADER) -> None:
        self.pair = (header, token)

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        md = grpc.aio.Metadata(*(details.metadata or ()), self.pair)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, md,
                                          details.credentials, details.wait_for_ready)


# grpc.aio files each interceptor under ONE call type (the first isinstance that matches),
# so the unary-unary and unary-stream halves must be separate objects.
class _UnaryToken(_TokenMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any,
                                    request: Any) -> Any:
        return await continuation(self._with_token(details), request)


class _StreamToken(_TokenMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any,
                                     request: Any) -> Any:
        return await continuation(self._with_token(details), request)


def token_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that send ``token`` on every call (none without a token)."""
    return [_UnaryToken(token), _StreamToken(token)] if token else []


def api_key_interceptors(key: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that send ``authorization: Bearer <key>`` (none without a key)."""
    value = f"Bearer {key}"
    return [_UnaryToken(value, AUTH_HEADER), _StreamToken(value, AUTH_HEADER)] if key else []


def gateway_channel(address: str, tls_ca: str = "", api_key: str = "",
                    tls_server_name: str = "",
                    options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """A client's channel to a gateway's public door: TLS when ``tls_ca`` (a PEM of the CA
    that signed the gateway's certificate) is set, the API key on every call when set.

    ``tls_server_name`` is the name the certificate must carry when ``address`` is not
    it (a device dialling the gateway through its local WAN relay)."""
    interceptors = api_key_interceptors(api_key) or None
    if not tls_ca:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    opts = [*options, ("grpc.ssl_target_name_override", tls_server_name)] \
        if tls_server_name else list(options)
    return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(
        Path(tls_ca).read_bytes()), options=opts, interceptors=interceptors)


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials:
    """TLS for a gRPC server from PEM files; ``client_ca`` requires client certificates."""
    pair = [(Path(key).read_bytes(), Path(cert).read_bytes())]
    if client_ca:
        return grpc.ssl_server_credentials(pair, root_certificates=Path(client_ca).read_bytes(),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials(pair)
