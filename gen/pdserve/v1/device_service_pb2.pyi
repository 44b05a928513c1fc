from pdserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeviceMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEVICE_MODE_UNSPECIFIED: _ClassVar[DeviceMode]
    DEVICE_MODE_DEVICE_ONLY: _ClassVar[DeviceMode]
    DEVICE_MODE_CLOUD_ONLY: _ClassVar[DeviceMode]
    DEVICE_MODE_PD_DEVICE: _ClassVar[DeviceMode]

class TokenSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOKEN_SOURCE_UNSPECIFIED: _ClassVar[TokenSource]
    TOKEN_SOURCE_CLOUD: _ClassVar[TokenSource]
    TOKEN_SOURCE_DEVICE: _ClassVar[TokenSource]
DEVICE_MODE_UNSPECIFIED: DeviceMode
DEVICE_MODE_DEVICE_ONLY: DeviceMode
DEVICE_MODE_CLOUD_ONLY: DeviceMode
DEVICE_MODE_PD_DEVICE: DeviceMode
TOKEN_SOURCE_UNSPECIFIED: TokenSource
TOKEN_SOURCE_CLOUD: TokenSource
TOKEN_SOURCE_DEVICE: TokenSource

class ChatRequest(_message.Message):
    __slots__ = ("prompt", "prompt_token_ids", "max_tokens", "use_chat_template", "mode", "request_id", "token_budget", "refine_ratio", "tau_ms", "ttft_target_ms", "tpot_max_ms", "min_quality", "device_index", "temperature", "top_p", "seed", "stop")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    USE_CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    REFINE_RATIO_FIELD_NUMBER: _ClassVar[int]
    TAU_MS_FIELD_NUMBER: _ClassVar[int]
    TTFT_TARGET_MS_FIELD_NUMBER: _ClassVar[int]
    TPOT_MAX_MS_FIELD_NUMBER: _ClassVar[int]
    MIN_QUALITY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_INDEX_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_tokens: int
    use_chat_template: bool
    mode: DeviceMode
    request_id: str
    token_budget: int
    refine_ratio: float
    tau_ms: float
    ttft_target_ms: float
    tpot_max_ms: float
    min_quality: float
    device_index: int
    temperature: float
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., max_tokens: _Optional[int] = ..., use_chat_template: _Optional[bool] = ..., mode: _Optional[_Union[DeviceMode, str]] = ..., request_id: _Optional[str] = ..., token_budget: _Optional[int] = ..., refine_ratio: _Optional[float] = ..., tau_ms: _Optional[float] = ..., ttft_target_ms: _Optional[float] = ..., tpot_max_ms: _Optional[float] = ..., min_quality: _Optional[float] = ..., device_index: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class DisplayedToken(_message.Message):
    __slots__ = ("token_id", "display_ms", "source")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_MS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    display_ms: float
    source: TokenSource
    def __init__(self, token_id: _Optional[int] = ..., display_ms: _Optional[float] = ..., source: _Optional[_Union[TokenSource, str]] = ...) -> None: ...

class ChatSummary(_message.Message):
    __slots__ = ("mode", "finish_reason", "ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "max_tpot_ms", "handoff_index", "handoff_ms", "cloud_tokens", "cloud_tokens_dropped", "cloud_busy_ms", "token_budget", "refine_ratio", "tau_ms", "prompt_tokens", "refined_prompt_tokens", "refine_method", "fallback", "device_prefill_ms", "e2e_ms", "device_index", "first_token_hold_ms", "tokens")
    MODE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    MEAN_TPOT_MS_FIELD_NUMBER: _ClassVar[int]
    P99_TPOT_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_TPOT_MS_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_INDEX_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_MS_FIELD_NUMBER: _ClassVar[int]
    CLOUD_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CLOUD_TOKENS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    CLOUD_BUSY_MS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    REFINE_RATIO_FIELD_NUMBER: _ClassVar[int]
    TAU_MS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REFINED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REFINE_METHOD_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    DEVICE_PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    E2E_MS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_INDEX_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_HOLD_MS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    mode: DeviceMode
    finish_reason: _common_pb2.FinishReason
    ttft_ms: float
    mean_tpot_ms: float
    p99_tpot_ms: float
    max_tpot_ms: float
    handoff_index: int
    handoff_ms: float
    cloud_tokens: int
    cloud_tokens_dropped: int
    cloud_busy_ms: float
    token_budget: int
    refine_ratio: float
    tau_ms: float
    prompt_tokens: int
    refined_prompt_tokens: int
    refine_method: str
    fallback: str
    device_prefill_ms: float
    e2e_ms: float
    device_index: int
    first_token_hold_ms: float
    tokens: int
    def __init__(self, mode: _Optional[_Union[DeviceMode, str]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., ttft_ms: _Optional[float] = ..., mean_tpot_ms: _Optional[float] = ..., p99_tpot_ms: _Optional[float] = ..., max_tpot_ms: _Optional[float] = ..., handoff_index: _Optional[int] = ..., handoff_ms: _Optional[float] = ..., cloud_tokens: _Optional[int] = ..., cloud_tokens_dropped: _Optional[int] = ..., cloud_busy_ms: _Optional[float] = ..., token_budget: _Optional[int] = ..., refine_ratio: _Optional[float] = ..., tau_ms: _Optional[float] = ..., prompt_tokens: _Optional[int] = ..., refined_prompt_tokens: _Optional[int] = ..., refine_method: _Optional[str] = ..., fallback: _Optional[str] = ..., device_prefill_ms: _Optional[float] = ..., e2e_ms: _Optional[float] = ..., device_index: _Optional[int] = ..., first_token_hold_ms: _Optional[float] = ..., tokens: _Optional[int] = ...) -> None: ...

class ChatResponse(_message.Message):
    __slots__ = ("tokens", "text", "summary", "request_id")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[DisplayedToken]
    text: str
    summary: ChatSummary
    request_id: str
    def __init__(self, tokens: _Optional[_Iterable[_Union[DisplayedToken, _Mapping]]] = ..., text: _Optional[str] = ..., summary: _Optional[_Union[ChatSummary, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...
