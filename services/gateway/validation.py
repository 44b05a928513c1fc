"""Turns a public GenerateRequest into a validated, tokenized request, or an
INVALID_ARGUMENT whose message says what to change. Pure: no I/O.

Every user string is bounded here, before anything else sees it: the client's
``request_id`` (a label only: the gateway keys everything by its own internal id),
``model``, ``scenario`` and the stop strings, by count and size. Error messages quote
user input cut short (``errors.quote``), so no reply or log line grows with it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pdserve.v1 import generation_service_pb2 as gen_pb
from services.common.errors import InvalidArgument, quote
from services.model.info import ModelInfo
from services.model.tokenizer import TextTokenizer

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # one stop string
MAX_REQUEST_ID_BYTES = 128  # the client's request_id, printable UTF-8
MAX_SCENARIO_BYTES = 128
MAX_MODEL_BYTES = 512  # a model name or a checkpoint path
# Below this a temperature is greedy: dividing logits by ~1e-45 overflows to inf/nan.
GREEDY_EPSILON = 1e-5


def _printable_label(value: str, max_bytes: int) -> bool:
    return len(value.encode()) <= max_bytes and value.isprintable()


@dataclass(frozen=True)
class ValidRequest:
    request_id: str  # the gateway's internal id: unique, the only key used downstream
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    scenario: str
    ttft_deadline_ms: int
    client_request_id: str = ""  # the client's label, echoed back, never a key


def validate(
    req: gen_pb.GenerateRequest, request_id: str, info: ModelInfo, tok: TextTokenizer,
    default_max_tokens: int,
) -> ValidRequest:
    """``request_id`` is the internal id the gateway gave this request; the client's own
    ``req.request_id`` is checked and kept as a label."""
    meta = {"request_id": request_id}

    def bad(msg: str, reason: str = "INVALID_ARGUMENT") -> InvalidArgument:
        return InvalidArgument(msg, reason=reason, metadata=meta)

    client_rid = req.request_id
    if client_rid and not _printable_label(client_rid, MAX_REQUEST_ID_BYTES):
        raise bad(f"request_id must be at most {MAX_REQUEST_ID_BYTES} bytes of printable "
                  f"UTF-8, got {len(client_rid.encode())} bytes: {quote(client_rid)}",
                  "BAD_REQUEST_ID")
    if client_rid:
        meta["client_request_id"] = client_rid
    if req.model and req.model not in (info.name, str(info.path)):
        raise bad(f"unknown model {quote(req.model)}; this cluster serves {info.name!r} "
                  "(leave model empty for the served model)", "UNKNOWN_MODEL")
    if len(req.model.encode()) > MAX_MODEL_BYTES:  # the served path itself, if absurdly long
        raise bad(f"model must be at most {MAX_MODEL_BYTES} bytes", "UNKNOWN_MODEL")
    if req.scenario and not _printable_label(req.scenario, MAX_SCENARIO_BYTES):
        raise bad(f"scenario must be at most {MAX_SCENARIO_BYTES} bytes of printable UTF-8, "
                  f"got {quote(req.scenario)}", "BAD_SCENARIO")
    if len(req.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS
                                                for s in req.stop):
        raise bad(f"stop takes up to {MAX_STOP_STRINGS} non-empty strings of at most "
                  f"{MAX_STOP_CHARS} characters each")
    if req.prompt and req.prompt_token_ids:
        raise bad("set either prompt or prompt_token_ids, not both")
    if req.prompt_token_ids:
        if req.use_chat_template:
            raise bad("use_chat_template applies to a text prompt, not to prompt_token_ids")
        ids = list(req.prompt_token_ids)
        bad_ids = [t for t in ids if not 0 <= t < info.vocab_size]
        if bad_ids:
            raise bad(f"prompt_token_ids has ids outside the vocabulary [0, {info.vocab_size}): "
                      f"{bad_ids[:5]}", "TOKEN_OUT_OF_VOCAB")
    elif req.prompt:
        try:
            ids = tok.encode_chat(req.prompt) if req.use_chat_template else tok.encode(req.prompt)
        except ValueError as e:
            raise bad(str(e)) from None
        if not ids:
            raise bad("the prompt tokenized to zero tokens", "EMPTY_PROMPT")
    else:
        raise bad("the prompt is empty: set prompt or prompt_token_ids", "EMPTY_PROMPT")
    ctx = info.max_context
    if len(ids) >= ctx:
        raise bad(f"the prompt has {len(ids)} tokens; the model's context is {ctx}, so the "
                  f"prompt must be at most {ctx - 1} tokens", "PROMPT_TOO_LONG")
    room = ctx - len(ids)
    if req.HasField("max_tokens"):
        if req.max_tokens <= 0:
            raise bad(f"max_tokens must be > 0, got {req.max_tokens}")
        if req.max_tokens > room:
            raise bad(f"max_tokens={req.max_tokens} plus the {len(ids)}-token prompt exceeds the "
                      f"context of {ctx}; use max_tokens <= {room}", "MAX_TOKENS_TOO_LARGE")
        max_tokens = req.max_tokens
    else:
        max_tokens = min(default_max_tokens, room)
    if not math.isfinite(req.temperature) or req.temperature < 0:
        raise bad(f"temperature must be >= 0, got {req.temperature}")
    temperature = req.temperature if req.temperature >= GREEDY_EPSILON else 0.0
    top_p = req.top_p if req.HasField("top_p") else 1.0
    if not 0.0 < top_p <= 1.0:
        raise bad(f"top_p must be in (0, 1], got {top_p}")
    return ValidRequest(
        request_id=request_id, prompt_ids=ids, max_tokens=max_tokens,
        temperature=temperature, top_p=top_p,
        seed=req.seed if req.HasField("seed") else None, stop=tuple(req.stop),
        scenario=req.scenario, ttft_deadline_ms=req.ttft_deadline_ms,
        client_request_id=client_rid,
    )
