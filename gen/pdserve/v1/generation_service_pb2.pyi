from pdserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "prompt_token_ids", "max_tokens", "temperature", "top_p", "seed", "stop", "scenario", "request_id", "ttft_deadline_ms", "use_chat_template", "model", "device_assist")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    SCENARIO_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TTFT_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    USE_CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ASSIST_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    scenario: str
    request_id: str
    ttft_deadline_ms: int
    use_chat_template: bool
    model: str
    device_assist: DeviceAssist
    def __init__(self, prompt: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., scenario: _Optional[str] = ..., request_id: _Optional[str] = ..., ttft_deadline_ms: _Optional[int] = ..., use_chat_template: _Optional[bool] = ..., model: _Optional[str] = ..., device_assist: _Optional[_Union[DeviceAssist, _Mapping]] = ...) -> None: ...

class DeviceAssist(_message.Message):
    __slots__ = ("token_budget", "refine_ratio")
    TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    REFINE_RATIO_FIELD_NUMBER: _ClassVar[int]
    token_budget: int
    refine_ratio: float
    def __init__(self, token_budget: _Optional[int] = ..., refine_ratio: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token_ids", "text", "finish_reason", "timings", "request_id", "prompt_tokens", "refined_prompt_token_ids", "refine_method")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REFINED_PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    REFINE_METHOD_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish_reason: _common_pb2.FinishReason
    timings: _common_pb2.Timings
    request_id: str
    prompt_tokens: int
    refined_prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    refine_method: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., timings: _Optional[_Union[_common_pb2.Timings, _Mapping]] = ..., request_id: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., refined_prompt_token_ids: _Optional[_Iterable[int]] = ..., refine_method: _Optional[str] = ...) -> None: ...
