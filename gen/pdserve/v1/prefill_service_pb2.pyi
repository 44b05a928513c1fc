from pdserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdmissionMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADMISSION_MODE_UNSPECIFIED: _ClassVar[AdmissionMode]
    ADMISSION_MODE_QUEUE: _ClassVar[AdmissionMode]
    ADMISSION_MODE_REJECT_IF_BUSY: _ClassVar[AdmissionMode]

class RejectReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REJECT_REASON_UNSPECIFIED: _ClassVar[RejectReason]
    REJECT_REASON_SLOTS_FULL: _ClassVar[RejectReason]
    REJECT_REASON_KV_CAPACITY: _ClassVar[RejectReason]
    REJECT_REASON_DRAINING: _ClassVar[RejectReason]
    REJECT_REASON_DEADLINE: _ClassVar[RejectReason]
ADMISSION_MODE_UNSPECIFIED: AdmissionMode
ADMISSION_MODE_QUEUE: AdmissionMode
ADMISSION_MODE_REJECT_IF_BUSY: AdmissionMode
REJECT_REASON_UNSPECIFIED: RejectReason
REJECT_REASON_SLOTS_FULL: RejectReason
REJECT_REASON_KV_CAPACITY: RejectReason
REJECT_REASON_DRAINING: RejectReason
REJECT_REASON_DEADLINE: RejectReason

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "ttft_deadline_unix_ms", "scenario", "admission_mode", "refine_ratio", "client_request_id", "gateway_id", "first_token_only")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TTFT_DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SCENARIO_FIELD_NUMBER: _ClassVar[int]
    ADMISSION_MODE_FIELD_NUMBER: _ClassVar[int]
    REFINE_RATIO_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ONLY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    ttft_deadline_unix_ms: int
    scenario: str
    admission_mode: AdmissionMode
    refine_ratio: float
    client_request_id: str
    gateway_id: str
    first_token_only: bool
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., ttft_deadline_unix_ms: _Optional[int] = ..., scenario: _Optional[str] = ..., admission_mode: _Optional[_Union[AdmissionMode, str]] = ..., refine_ratio: _Optional[float] = ..., client_request_id: _Optional[str] = ..., gateway_id: _Optional[str] = ..., first_token_only: _Optional[bool] = ...) -> None: ...

class PrefillAccepted(_message.Message):
    __slots__ = ("instance_id", "queue_ms")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    queue_ms: float
    def __init__(self, instance_id: _Optional[str] = ..., queue_ms: _Optional[float] = ...) -> None: ...

class PrefillRejected(_message.Message):
    __slots__ = ("reason", "message")
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    reason: RejectReason
    message: str
    def __init__(self, reason: _Optional[_Union[RejectReason, str]] = ..., message: _Optional[str] = ...) -> None: ...

class FirstToken(_message.Message):
    __slots__ = ("token_id", "prefill_ms")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    prefill_ms: float
    def __init__(self, token_id: _Optional[int] = ..., prefill_ms: _Optional[float] = ...) -> None: ...

class KvReady(_message.Message):
    __slots__ = ("kv", "kv_stage_ms")
    KV_FIELD_NUMBER: _ClassVar[int]
    KV_STAGE_MS_FIELD_NUMBER: _ClassVar[int]
    kv: _common_pb2.KvRef
    kv_stage_ms: float
    def __init__(self, kv: _Optional[_Union[_common_pb2.KvRef, _Mapping]] = ..., kv_stage_ms: _Optional[float] = ...) -> None: ...

class RefinedPrompt(_message.Message):
    __slots__ = ("token_ids", "method", "refine_ms")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    REFINE_MS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    method: str
    refine_ms: float
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., method: _Optional[str] = ..., refine_ms: _Optional[float] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("accepted", "rejected", "first_token", "kv_ready", "refined")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    KV_READY_FIELD_NUMBER: _ClassVar[int]
    REFINED_FIELD_NUMBER: _ClassVar[int]
    accepted: PrefillAccepted
    rejected: PrefillRejected
    first_token: FirstToken
    kv_ready: KvReady
    refined: RefinedPrompt
    def __init__(self, accepted: _Optional[_Union[PrefillAccepted, _Mapping]] = ..., rejected: _Optional[_Union[PrefillRejected, _Mapping]] = ..., first_token: _Optional[_Union[FirstToken, _Mapping]] = ..., kv_ready: _Optional[_Union[KvReady, _Mapping]] = ..., refined: _Optional[_Union[RefinedPrompt, _Mapping]] = ...) -> None: ...

class GetPrefillStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetPrefillStatsResponse(_message.Message):
    __slots__ = ("instance_id", "slots", "busy_slots", "queued", "accepted_total", "rejected_total", "completed_total", "cancelled_total", "failed_total", "unreachable_total")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    BUSY_SLOTS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REJECTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FAILED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_TOTAL_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    slots: int
    busy_slots: int
    queued: int
    accepted_total: int
    rejected_total: int
    completed_total: int
    cancelled_total: int
    failed_total: int
    unreachable_total: int
    def __init__(self, instance_id: _Optional[str] = ..., slots: _Optional[int] = ..., busy_slots: _Optional[int] = ..., queued: _Optional[int] = ..., accepted_total: _Optional[int] = ..., rejected_total: _Optional[int] = ..., completed_total: _Optional[int] = ..., cancelled_total: _Optional[int] = ..., failed_total: _Optional[int] = ..., unreachable_total: _Optional[int] = ...) -> None: ...
