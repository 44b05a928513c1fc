"""services.common.errors: domain errors and their rich gRPC status."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2

from services.common.errors import (
    DOMAIN,
    Aborted,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PdserveError,
    ResourceExhausted,
    Unavailable,
    to_status,
)

pytestmark = pytest.mark.unit

DETAILS_KEY = "grpc-status-details-bin"


def _decode(st: grpc.Status) -> tuple[status_pb2.Status, error_details_pb2.ErrorInfo]:
    md = dict(st.trailing_metadata)
    assert set(md) == {DETAILS_KEY}
    rich = status_pb2.Status.FromString(md[DETAILS_KEY])
    assert len(rich.details) == 1
    assert rich.details[0].Is(error_details_pb2.ErrorInfo.DESCRIPTOR)
    info = error_details_pb2.ErrorInfo()
    assert rich.details[0].Unpack(info)
    return rich, info


def test_to_status_carries_code_message_and_error_info() -> None:
    err = ResourceExhausted("kvstore is full", reason="KV_CAPACITY",
                            metadata={"request_id": "r-1", "instance": "kv-0"})
    st = to_status(err)
    assert st.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert st.details == "kvstore is full"
    rich, info = _decode(st)
    assert rich.code == code_pb2.RESOURCE_EXHAUSTED
    assert rich.message == "kvstore is full"
    assert info.reason == "KV_CAPACITY"
    assert info.domain == DOMAIN == "pdserve"
    assert dict(info.metadata) == {"request_id": "r-1", "instance": "kv-0"}


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
        (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (Unavailable, grpc.StatusCode.UNAVAILABLE),
        (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
        (NotFound, grpc.StatusCode.NOT_FOUND),
        (Aborted, grpc.StatusCode.ABORTED),
        (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
        (PdserveError, grpc.StatusCode.INTERNAL),
    ],
)
def test_each_class_maps_to_its_code_and_default_reason(
    cls: type[PdserveError], code: grpc.StatusCode
) -> None:
    err = cls("boom")
    assert err.code is code and err.reason == code.name
    st = to_status(err)
    assert st.code is code
    rich, info = _decode(st)
    assert rich.code == code.value[0]
    assert info.reason == code.name and info.domain == "pdserve"
    assert dict(info.metadata) == {}


def test_explicit_code_and_reason_override_class_defaults() -> None:
    err = PdserveError("nope", code=grpc.StatusCode.PERMISSION_DENIED, reason="NO_ENTRY")
    st = to_status(err)
    assert st.code is grpc.StatusCode.PERMISSION_DENIED
    _, info = _decode(st)
    assert info.reason == "NO_ENTRY"
    # Overriding one instance does not change the class.
    assert PdserveError("x").reason == "INTERNAL"
    assert PdserveError("x").code is grpc.StatusCode.INTERNAL


def test_metadata_is_copied() -> None:
    meta = {"request_id": "a"}
    err = InvalidArgument("bad", metadata=meta)
    meta["request_id"] = "changed"
    assert err.metadata == {"request_id": "a"}
    assert str(err) == err.message == "bad"
