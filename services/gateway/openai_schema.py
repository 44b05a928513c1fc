"""OpenAI request and response shapes for the HTTP door, mapped onto GenerateRequest.

Requests are parsed with pydantic (unknown fields are ignored, as OpenAI's own SDKs
add some); what pdserve cannot honour is refused with a 400 that names the parameter
(n > 1, logprobs, tools, penalties, logit_bias, best_of, echo, suffix). Sampling follows
the OpenAI defaults: ``temperature`` 1.0 and ``top_p`` 1.0 when unset (pass
``temperature: 0`` for greedy). pdserve's own fields go in the body (the OpenAI SDK's
``extra_body``) or in headers:

  body field         header                        meaning
  scenario           X-Pdserve-Scenario            scenario group (empty: default group)
  ttft_deadline_ms   X-Pdserve-Ttft-Deadline-Ms    TTFT deadline (504 when missed)
  request_id         X-Request-Id                  id for tracing, logs and errors

Responses are plain dicts (they are built per token, so no model validation there).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Literal

import grpc
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pdserve.v1 import common_pb2
from pdserve.v1 import generation_service_pb2 as pb
from services.common.errors import InvalidArgument, PdserveError

FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
          common_pb2.FINISH_REASON_CANCELLED: "abort"}
HEADER_SCENARIO = "x-pdserve-scenario"
HEADER_TTFT = "x-pdserve-ttft-deadline-ms"
HEADER_REQUEST_ID = "x-request-id"
MAX_REQUEST_ID = 128


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")
    model: str = ""
    max_tokens: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=1 << 64)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logprobs: Any = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # pdserve extras (the SDK's extra_body lands here)
    scenario: str = ""
    ttft_deadline_ms: int = Field(default=0, ge=0, lt=1 << 32)
    request_id: str = Field(default="", max_length=MAX_REQUEST_ID)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """Plain text of the message; content parts must all be text."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.get("type") != "text":
                raise InvalidArgument(f"content part of type {p.get('type')!r} is not supported "
                                      "(text only)", reason="UNSUPPORTED_PARAMETER",
                                      metadata={"param": "messages"})
            parts.append(str(p.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]
    best_of: int | None = None
    echo: bool = False
    suffix: str | None = None


def parse(cls: type[_Common], body: Any) -> _Common:
    """Validate a JSON body; a bad field becomes InvalidArgument naming it."""
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err.get("loc", ()))
        raise InvalidArgument(f"{param}: {err.get('msg', 'invalid')}" if param
                              else str(err.get("msg")), reason="INVALID_ARGUMENT",
                              metadata={"param": param}) from None


def _unsupported(param: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"{param}: {why}", reason="UNSUPPORTED_PARAMETER",
                           metadata={"param": param})


def _check_common(r: _Common) -> None:
    if r.n != 1:
        raise _unsupported("n", f"only n=1 is supported, got {r.n}; send n requests instead")
    if r.logprobs or r.top_logprobs:
        raise _unsupported("logprobs", "log probabilities are not returned by pdserve")
    if r.presence_penalty or r.frequency_penalty:
        raise _unsupported("presence_penalty" if r.presence_penalty else "frequency_penalty",
                           "penalties are not supported; leave them at 0")
    if r.logit_bias:
        raise _unsupported("logit_bias", "not supported")


def build_request(r: _Common, headers: Mapping[str, str], chat_ids: list[int] | None
                  ) -> pb.GenerateRequest:
    """The GenerateRequest the gRPC path would get; ``chat_ids`` is the chat prompt
    rendered with the model's template (chat), None for /v1/completions."""
    _check_common(r)
    req = pb.GenerateRequest(
        model=r.model,
        temperature=1.0 if r.temperature is None else r.temperature,
        scenario=r.scenario or headers.get(HEADER_SCENARIO, ""),
        request_id=r.request_id or headers.get(HEADER_REQUEST_ID, "")[:MAX_REQUEST_ID],
        ttft_deadline_ms=r.ttft_deadline_ms or _header_int(headers, HEADER_TTFT))
    max_tokens = r.max_tokens
    if isinstance(r, ChatCompletionRequest):
        if r.tools or r.functions:
            raise _unsupported("tools", "tool calling is not supported")
        if r.response_format and r.response_format.get("type", "text") != "text":
            raise _unsupported("response_format", "only type 'text' is supported")
        max_tokens = r.max_completion_tokens or max_tokens
        assert chat_ids is not None
        req.prompt_token_ids.extend(chat_ids)
    elif isinstance(r, CompletionRequest):
        if r.best_of not in (None, 1):
            raise _unsupported("best_of", "only best_of=1 is supported")
        if r.echo or r.suffix:
            raise _unsupported("echo" if r.echo else "suffix", "not supported")
        prompt = r.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            req.prompt_token_ids.extend(prompt)
        elif isinstance(prompt, list):
            if len(prompt) != 1:
                raise _unsupported("prompt", f"one prompt per request, got {len(prompt)}")
            req.prompt = str(prompt[0])
        else:
            req.prompt = prompt
    if max_tokens is not None:
        req.max_tokens = max_tokens
    if r.top_p is not None:
        req.top_p = r.top_p
    if r.seed is not None:
        req.seed = r.seed
    if r.stop:
        req.stop.extend([r.stop] if isinstance(r.stop, str) else r.stop)
    return req


def _header_int(headers: Mapping[str, str], name: str) -> int:
    raw = headers.get(name, "")
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise InvalidArgument(f"header {name} must be an integer, got {raw[:32]!r}",
                              metadata={"param": name}) from None
    if not 0 <= value < 1 << 32:
        raise InvalidArgument(f"header {name} must be in [0, 2^32)", metadata={"param": name})
    return value


# --- responses ------------------------------------------------------------------------

class Answer:
    """Accumulates one request's stream for the response bodies."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.created = int(time.time())
        self.request_id = ""
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.text: list[str] = []
        self.finish = ""

    @property
    def id(self) -> str:
        return ("chatcmpl-" if self.chat else "cmpl-") + self.request_id

    def add(self, msg: pb.GenerateResponse) -> str:
        if msg.request_id:
            self.request_id = msg.request_id
        if msg.prompt_tokens:
            self.prompt_tokens = msg.prompt_tokens
        self.completion_tokens += len(msg.token_ids)
        if msg.finish_reason:
            self.finish = FINISH.get(msg.finish_reason, "stop")
        if msg.text:
            self.text.append(msg.text)
        return msg.text

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def full(self) -> dict[str, Any]:
        text = "".join(self.text)
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant",
                                                              "content": text},
                                      "logprobs": None, "finish_reason": self.finish}
            return {**self._head("chat.completion"), "choices": [choice], "usage": self.usage()}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": self.finish}
        return {**self._head("text_completion"), "choices": [choice], "usage": self.usage()}

    def chunk(self, text: str, finish: str | None, usage_slot: bool,
              first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first \
                else ({"content": text} if text else {})
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None,
                                      "finish_reason": finish}
            out = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            out = {**self._head("text_completion"),
                   "choices": [{"index": 0, "text": text, "logprobs": None,
                                "finish_reason": finish}]}
        if usage_slot:
            out["usage"] = None
        return out

    def usage_chunk(self) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": self.usage()}


# --- errors ---------------------------------------------------------------------------

_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.ABORTED: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
}


def error_body(err: PdserveError) -> tuple[int, dict[str, Any]]:
    """OpenAI's error JSON and HTTP status for one of our errors. ``code`` is the
    ErrorInfo reason the gRPC door reports (e.g. PROMPT_TOO_LONG, PREFILLS_BUSY)."""
    status, kind = _STATUS.get(err.code, (500, "server_error"))
    if err.reason == "UNKNOWN_MODEL":
        status, kind = 404, "invalid_request_error"
    return status, {"error": {"message": err.message, "type": kind,
                              "param": err.metadata.get("param"), "code": err.reason}}
