"""OpenAI request -> GenerateRequest mapping, refusals, response shapes and the error
status table of the HTTP door (services/gateway/openai_schema.py). Pure."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from pdserve.v1 import common_pb2
from pdserve.v1 import generation_service_pb2 as pb
from services.common.auth import bearer_ok, parse_keys
from services.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    PdserveError,
    ResourceExhausted,
    Unavailable,
)
from services.gateway.openai_schema import (
    Answer,
    ChatCompletionRequest,
    CompletionRequest,
    build_request,
    error_body,
    parse,
)

pytestmark = pytest.mark.unit
CHAT = [{"role": "user", "content": "hi"}]


def chat(body: dict[str, Any], headers: dict[str, str] | None = None) -> pb.GenerateRequest:
    r = parse(ChatCompletionRequest, {"messages": CHAT, **body})
    return build_request(r, headers or {}, [1, 2, 3])


def test_chat_maps_every_parameter() -> None:
    req = chat({"model": "m", "max_tokens": 5, "max_completion_tokens": 7, "temperature": 0,
                "top_p": 0.5, "seed": 3, "stop": "\n", "user": "u", "scenario": "code",
                "ttft_deadline_ms": 250, "request_id": "r1"})
    assert list(req.prompt_token_ids) == [1, 2, 3] and not req.prompt
    assert req.max_tokens == 7  # max_completion_tokens wins
    assert req.temperature == 0 and req.top_p == 0.5 and req.seed == 3
    assert list(req.stop) == ["\n"] and req.model == "m"
    assert (req.scenario, req.ttft_deadline_ms, req.request_id) == ("code", 250, "r1")


def test_openai_defaults_and_headers() -> None:
    req = chat({}, {"x-pdserve-scenario": "conv", "x-pdserve-ttft-deadline-ms": "900",
                    "x-request-id": "h1"})
    assert req.temperature == 1.0  # OpenAI's default, not greedy
    assert not req.HasField("max_tokens") and not req.HasField("top_p")
    assert (req.scenario, req.ttft_deadline_ms, req.request_id) == ("conv", 900, "h1")
    body_wins = chat({"scenario": "code"}, {"x-pdserve-scenario": "conv"})
    assert body_wins.scenario == "code"


@pytest.mark.parametrize("prompt", ["text", ["text"], [5, 6, 7]])
def test_completion_prompt_forms(prompt: Any) -> None:
    req = build_request(parse(CompletionRequest, {"prompt": prompt, "stop": ["a", "b"]}), {},
                        None)
    if isinstance(prompt, list) and isinstance(prompt[0], int):
        assert list(req.prompt_token_ids) == prompt
    else:
        assert req.prompt == "text"
    assert not req.use_chat_template and list(req.stop) == ["a", "b"]


@pytest.mark.parametrize(("body", "param"), [
    ({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"top_logprobs": 2}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"), ({"logit_bias": {"1": 2.0}}, "logit_bias"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
])
def test_unsupported_parameters_are_named(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        chat(body)
    assert e.value.reason == "UNSUPPORTED_PARAMETER" and e.value.metadata["param"] == param


@pytest.mark.parametrize(("body", "param"), [
    ({"temperature": 3}, "temperature"), ({"max_tokens": 0}, "max_tokens"),
    ({"top_p": 0}, "top_p"), ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
])
def test_invalid_values_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        parse(ChatCompletionRequest, {"messages": CHAT, **body})
    assert e.value.metadata["param"] == param


def test_bad_header_and_batched_prompt() -> None:
    with pytest.raises(InvalidArgument):
        chat({}, {"x-pdserve-ttft-deadline-ms": "soon"})
    with pytest.raises(InvalidArgument):
        build_request(parse(CompletionRequest, {"prompt": ["a", "b"]}), {}, None)


def test_answer_shapes() -> None:
    a = Answer(chat=True, model="tiny")
    a.add(pb.GenerateResponse(token_ids=[1], text="Par", request_id="rid", prompt_tokens=9))
    a.add(pb.GenerateResponse(token_ids=[2, 3], text="is"))
    a.add(pb.GenerateResponse(text=".", finish_reason=common_pb2.FINISH_REASON_STOP))
    full = a.full()
    assert full["id"] == "chatcmpl-rid" and full["object"] == "chat.completion"
    assert full["choices"][0]["message"] == {"role": "assistant", "content": "Paris."}
    assert full["choices"][0]["finish_reason"] == "stop"
    assert full["usage"] == {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    first = a.chunk("Par", None, usage_slot=True, first=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Par"}
    assert first["usage"] is None
    assert "usage" not in a.chunk("x", None, usage_slot=False)
    assert a.usage_chunk()["choices"] == []
    c = Answer(chat=False, model="tiny")
    c.add(pb.GenerateResponse(token_ids=[1], text="x", finish_reason=2, request_id="q"))
    assert c.full()["object"] == "text_completion" and c.full()["choices"][0]["text"] == "x"
    assert c.full()["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(("err", "status", "kind"), [
    (InvalidArgument("x", reason="PROMPT_TOO_LONG"), 400, "invalid_request_error"),
    (InvalidArgument("x", reason="UNKNOWN_MODEL"), 404, "invalid_request_error"),
    (ResourceExhausted("x", reason="PREFILLS_BUSY"), 429, "rate_limit_error"),
    (Unavailable("x", reason="NO_PREFILL"), 503, "service_unavailable"),
    (DeadlineExceeded("x"), 504, "timeout"),
    (PdserveError("x", reason="UNAUTHENTICATED", code=grpc.StatusCode.UNAUTHENTICATED), 401,
     "authentication_error"),
    (PdserveError("x"), 500, "server_error"),
])
def test_error_status_table(err: PdserveError, status: int, kind: str) -> None:
    got, body = error_body(err)
    assert got == status and body["error"]["type"] == kind
    assert body["error"]["code"] == err.reason and body["error"]["message"] == "x"


def test_bearer_check() -> None:
    keys = parse_keys(" a , b,,")
    assert keys == ("a", "b")
    assert bearer_ok("Bearer a", keys) and bearer_ok("bearer b", keys)
    assert not bearer_ok(None, keys) and not bearer_ok("Bearer c", keys)
    assert not bearer_ok("Basic a", keys) and not bearer_ok("Bearer", keys)
    assert bearer_ok(None, ())  # no key configured: open
