from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_STATE_UNSPECIFIED: _ClassVar[WorkerState]
    WORKER_STATE_STARTING: _ClassVar[WorkerState]
    WORKER_STATE_SERVING: _ClassVar[WorkerState]
    WORKER_STATE_DRAINING: _ClassVar[WorkerState]
    WORKER_STATE_DRAINED: _ClassVar[WorkerState]
    WORKER_STATE_IDLE: _ClassVar[WorkerState]
WORKER_STATE_UNSPECIFIED: WorkerState
WORKER_STATE_STARTING: WorkerState
WORKER_STATE_SERVING: WorkerState
WORKER_STATE_DRAINING: WorkerState
WORKER_STATE_DRAINED: WorkerState
WORKER_STATE_IDLE: WorkerState

class GetWorkerStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("instance_id", "state", "role", "group", "in_flight", "model", "model_fingerprint", "fence", "last_drain_ms", "last_load_ms", "last_switch_ms", "weights_kept", "pool_kept", "aborted_on_drain_total", "switches_total", "address")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    LAST_DRAIN_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_SWITCH_MS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_KEPT_FIELD_NUMBER: _ClassVar[int]
    POOL_KEPT_FIELD_NUMBER: _ClassVar[int]
    ABORTED_ON_DRAIN_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SWITCHES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    state: WorkerState
    role: str
    group: str
    in_flight: int
    model: str
    model_fingerprint: str
    fence: int
    last_drain_ms: float
    last_load_ms: float
    last_switch_ms: float
    weights_kept: bool
    pool_kept: bool
    aborted_on_drain_total: int
    switches_total: int
    address: str
    def __init__(self, instance_id: _Optional[str] = ..., state: _Optional[_Union[WorkerState, str]] = ..., role: _Optional[str] = ..., group: _Optional[str] = ..., in_flight: _Optional[int] = ..., model: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., fence: _Optional[int] = ..., last_drain_ms: _Optional[float] = ..., last_load_ms: _Optional[float] = ..., last_switch_ms: _Optional[float] = ..., weights_kept: _Optional[bool] = ..., pool_kept: _Optional[bool] = ..., aborted_on_drain_total: _Optional[int] = ..., switches_total: _Optional[int] = ..., address: _Optional[str] = ...) -> None: ...

class AssignRequest(_message.Message):
    __slots__ = ("role", "group", "fence", "timeout_s", "settings")
    class SettingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ROLE_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    role: str
    group: str
    fence: int
    timeout_s: float
    settings: _containers.ScalarMap[str, str]
    def __init__(self, role: _Optional[str] = ..., group: _Optional[str] = ..., fence: _Optional[int] = ..., timeout_s: _Optional[float] = ..., settings: _Optional[_Mapping[str, str]] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("fence", "timeout_s")
    FENCE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    fence: int
    timeout_s: float
    def __init__(self, fence: _Optional[int] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("fence", "timeout_s")
    FENCE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    fence: int
    timeout_s: float
    def __init__(self, fence: _Optional[int] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class ListGroupsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Member(_message.Message):
    __slots__ = ("instance_id", "role", "group", "address", "state")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    role: str
    group: str
    address: str
    state: str
    def __init__(self, instance_id: _Optional[str] = ..., role: _Optional[str] = ..., group: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[str] = ...) -> None: ...

class GroupInfo(_message.Message):
    __slots__ = ("name", "prefill", "decode", "members")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    prefill: int
    decode: int
    members: _containers.RepeatedCompositeFieldContainer[Member]
    def __init__(self, name: _Optional[str] = ..., prefill: _Optional[int] = ..., decode: _Optional[int] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ...) -> None: ...

class ListGroupsResponse(_message.Message):
    __slots__ = ("groups", "spares")
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    SPARES_FIELD_NUMBER: _ClassVar[int]
    groups: _containers.RepeatedCompositeFieldContainer[GroupInfo]
    spares: _containers.RepeatedCompositeFieldContainer[Member]
    def __init__(self, groups: _Optional[_Iterable[_Union[GroupInfo, _Mapping]]] = ..., spares: _Optional[_Iterable[_Union[Member, _Mapping]]] = ...) -> None: ...

class ScaleOutRequest(_message.Message):
    __slots__ = ("group", "prefill", "decode", "timeout_s")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    group: str
    prefill: int
    decode: int
    timeout_s: float
    def __init__(self, group: _Optional[str] = ..., prefill: _Optional[int] = ..., decode: _Optional[int] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class ScaleInRequest(_message.Message):
    __slots__ = ("group", "timeout_s")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    group: str
    timeout_s: float
    def __init__(self, group: _Optional[str] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class RollingUpgradeRequest(_message.Message):
    __slots__ = ("groups", "settings", "timeout_s")
    class SettingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    groups: _containers.RepeatedScalarFieldContainer[str]
    settings: _containers.ScalarMap[str, str]
    timeout_s: float
    def __init__(self, groups: _Optional[_Iterable[str]] = ..., settings: _Optional[_Mapping[str, str]] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class SubstituteRequest(_message.Message):
    __slots__ = ("instance_id", "group", "timeout_s")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    group: str
    timeout_s: float
    def __init__(self, instance_id: _Optional[str] = ..., group: _Optional[str] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class OpEvent(_message.Message):
    __slots__ = ("message", "instance_id", "step", "elapsed_ms", "done", "ok")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_MS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    message: str
    instance_id: str
    step: str
    elapsed_ms: float
    done: bool
    ok: bool
    def __init__(self, message: _Optional[str] = ..., instance_id: _Optional[str] = ..., step: _Optional[str] = ..., elapsed_ms: _Optional[float] = ..., done: _Optional[bool] = ..., ok: _Optional[bool] = ...) -> None: ...
