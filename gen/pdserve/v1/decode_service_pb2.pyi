from pdserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DecodeRequest(_message.Message):
    __slots__ = ("request_id", "kv", "first_token_id", "sampling", "max_new_tokens", "stop_token_ids", "client_request_id", "wait_for_slot_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_FOR_SLOT_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    kv: _common_pb2.KvRef
    first_token_id: int
    sampling: _common_pb2.SamplingParams
    max_new_tokens: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    client_request_id: str
    wait_for_slot_ms: int
    def __init__(self, request_id: _Optional[str] = ..., kv: _Optional[_Union[_common_pb2.KvRef, _Mapping]] = ..., first_token_id: _Optional[int] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., client_request_id: _Optional[str] = ..., wait_for_slot_ms: _Optional[int] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("token_ids", "finish_reason", "kv_fetch_ms", "kv_transport", "kv_fallback")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    KV_FETCH_MS_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    KV_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: _common_pb2.FinishReason
    kv_fetch_ms: float
    kv_transport: str
    kv_fallback: bool
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., kv_fetch_ms: _Optional[float] = ..., kv_transport: _Optional[str] = ..., kv_fallback: _Optional[bool] = ...) -> None: ...

class GetDecodeStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetDecodeStatsResponse(_message.Message):
    __slots__ = ("instance_id", "slots", "active", "kv_bytes_held", "completed_total", "cancelled_total", "failed_total", "steps_total", "step_seconds_total", "slot_waits_total", "full_refusals_total")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_HELD_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FAILED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    STEPS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SLOT_WAITS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FULL_REFUSALS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    slots: int
    active: int
    kv_bytes_held: int
    completed_total: int
    cancelled_total: int
    failed_total: int
    steps_total: int
    step_seconds_total: float
    slot_waits_total: int
    full_refusals_total: int
    def __init__(self, instance_id: _Optional[str] = ..., slots: _Optional[int] = ..., active: _Optional[int] = ..., kv_bytes_held: _Optional[int] = ..., completed_total: _Optional[int] = ..., cancelled_total: _Optional[int] = ..., failed_total: _Optional[int] = ..., steps_total: _Optional[int] = ..., step_seconds_total: _Optional[float] = ..., slot_waits_total: _Optional[int] = ..., full_refusals_total: _Optional[int] = ...) -> None: ...
