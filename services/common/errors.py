"""Domain errors and their gRPC mapping.

Every error a user can see is a ``PdserveError`` carrying a canonical gRPC code
and an UPPER_SNAKE reason. ``abort_with`` turns it into a gRPC status with a
``google.rpc.ErrorInfo`` detail (domain ``pdserve``, metadata such as request_id),
so clients in any language can dispatch on ``reason`` instead of parsing text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "pdserve"
QUOTE_CHARS = 48  # how much of a user's string an error message repeats


def quote(value: str, limit: int = QUOTE_CHARS) -> str:
    """``value`` for an error message: repr'd and cut to ``limit`` characters, so a user's
    20 KB string can never blow up grpc-message or the log (the length is still said)."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


class PdserveError(Exception):
    """An error with a gRPC status code, a machine-readable reason and metadata."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        code: grpc.StatusCode | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        if code is not None:
            self.code = code
        self.metadata = dict(metadata or {})


class InvalidArgument(PdserveError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class ResourceExhausted(PdserveError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"


class Unavailable(PdserveError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


class DeadlineExceeded(PdserveError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class NotFound(PdserveError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class Aborted(PdserveError):
    code = grpc.StatusCode.ABORTED
    reason = "ABORTED"


class FailedPrecondition(PdserveError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


def to_status(err: PdserveError) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=err.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    st = status_pb2.Status(
        code=getattr(code_pb2, err.code.name), message=err.message, details=[detail]
    )
    return rpc_status.to_status(st)


async def abort_with(context: grpc.aio.ServicerContext, err: PdserveError) -> NoReturn:
    await context.abort_with_status(to_status(err))
    raise AssertionError("unreachable")  # abort_with_status always raises


def error_info(err: grpc.aio.AioRpcError | grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """Recover the ErrorInfo detail from a failed call, if the server attached one."""
    st = rpc_status.from_call(err)
    if st is None:
        return None
    for d in st.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            return info
    return None


def from_rpc_error(err: grpc.aio.AioRpcError, what: str, **metadata: str) -> PdserveError:
    """Re-raise a downstream failure as our own error, keeping its code and reason."""
    info = error_info(err)
    reason = info.reason if info is not None else err.code().name
    meta = dict(info.metadata) if info is not None else {}
    meta.update(metadata)
    return PdserveError(
        f"{what}: {err.details()}", reason=reason, code=err.code(), metadata=meta
    )
