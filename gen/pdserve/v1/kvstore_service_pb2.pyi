from pdserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KvState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_STATE_UNSPECIFIED: _ClassVar[KvState]
    KV_STATE_RESERVED: _ClassVar[KvState]
    KV_STATE_TRANSFERRING: _ClassVar[KvState]
    KV_STATE_READY: _ClassVar[KvState]
    KV_STATE_CONSUMED: _ClassVar[KvState]
    KV_STATE_ABORTED: _ClassVar[KvState]
    KV_STATE_EXPIRED: _ClassVar[KvState]
KV_STATE_UNSPECIFIED: KvState
KV_STATE_RESERVED: KvState
KV_STATE_TRANSFERRING: KvState
KV_STATE_READY: KvState
KV_STATE_CONSUMED: KvState
KV_STATE_ABORTED: KvState
KV_STATE_EXPIRED: KvState

class ReserveKvRequest(_message.Message):
    __slots__ = ("request_id", "nbytes", "lease_ms", "owner")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    nbytes: int
    lease_ms: int
    owner: str
    def __init__(self, request_id: _Optional[str] = ..., nbytes: _Optional[int] = ..., lease_ms: _Optional[int] = ..., owner: _Optional[str] = ...) -> None: ...

class ReserveKvResponse(_message.Message):
    __slots__ = ("handle", "data_address", "transport", "lease_expires_unix_ms", "endpoints")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    DATA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    handle: str
    data_address: str
    transport: str
    lease_expires_unix_ms: int
    endpoints: _containers.RepeatedCompositeFieldContainer[_common_pb2.KvEndpoint]
    def __init__(self, handle: _Optional[str] = ..., data_address: _Optional[str] = ..., transport: _Optional[str] = ..., lease_expires_unix_ms: _Optional[int] = ..., endpoints: _Optional[_Iterable[_Union[_common_pb2.KvEndpoint, _Mapping]]] = ...) -> None: ...

class ReleaseKvRequest(_message.Message):
    __slots__ = ("handle", "request_id", "reason")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    handle: str
    request_id: str
    reason: str
    def __init__(self, handle: _Optional[str] = ..., request_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ReleaseKvResponse(_message.Message):
    __slots__ = ("previous_state",)
    PREVIOUS_STATE_FIELD_NUMBER: _ClassVar[int]
    previous_state: KvState
    def __init__(self, previous_state: _Optional[_Union[KvState, str]] = ...) -> None: ...

class GetKvStoreStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetKvStoreStatsResponse(_message.Message):
    __slots__ = ("instance_id", "capacity_bytes", "bytes_held", "entries", "reserved_total", "consumed_total", "aborted_total", "expired_total", "rejected_total", "bytes_in_total", "bytes_out_total", "transfers")
    class TransfersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    BYTES_HELD_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    RESERVED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CONSUMED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ABORTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REJECTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    capacity_bytes: int
    bytes_held: int
    entries: int
    reserved_total: int
    consumed_total: int
    aborted_total: int
    expired_total: int
    rejected_total: int
    bytes_in_total: int
    bytes_out_total: int
    transfers: _containers.ScalarMap[str, int]
    def __init__(self, instance_id: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., bytes_held: _Optional[int] = ..., entries: _Optional[int] = ..., reserved_total: _Optional[int] = ..., consumed_total: _Optional[int] = ..., aborted_total: _Optional[int] = ..., expired_total: _Optional[int] = ..., rejected_total: _Optional[int] = ..., bytes_in_total: _Optional[int] = ..., bytes_out_total: _Optional[int] = ..., transfers: _Optional[_Mapping[str, int]] = ...) -> None: ...
