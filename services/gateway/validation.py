"""Turns a public GenerateRequest into a validated, tokenized request, or an
INVALID_ARGUMENT whose message says what to change. Pure: no I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pdserve.v1 import generation_service_pb2 as gen_pb
from services.common.errors import InvalidArgument
from services.model.info import ModelInfo
from services.model.tokenizer import TextTokenizer

MAX_STOP_STRINGS = 16


@dataclass(frozen=True)
class ValidRequest:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    scenario: str
    ttft_deadline_ms: int


def validate(
    req: gen_pb.GenerateRequest, request_id: str, info: ModelInfo, tok: TextTokenizer,
    default_max_tokens: int,
) -> ValidRequest:
    meta = {"request_id": request_id}

    def bad(msg: str, reason: str = "INVALID_ARGUMENT") -> InvalidArgument:
        return InvalidArgument(msg, reason=reason, metadata=meta)

    if req.model and req.model not in (info.name, str(info.path)):
        raise bad(f"unknown model {req.model!r}; this cluster serves {info.name!r} "
                  "(leave model empty for the served model)", "UNKNOWN_MODEL")
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
    top_p = req.top_p if req.HasField("top_p") else 1.0
    if not 0.0 < top_p <= 1.0:
        raise bad(f"top_p must be in (0, 1], got {top_p}")
    if len(req.stop) > MAX_STOP_STRINGS or any(not s for s in req.stop):
        raise bad(f"stop takes up to {MAX_STOP_STRINGS} non-empty strings")
    return ValidRequest(
        request_id=request_id, prompt_ids=ids, max_tokens=max_tokens,
        temperature=req.temperature, top_p=top_p,
        seed=req.seed if req.HasField("seed") else None, stop=tuple(req.stop),
        scenario=req.scenario, ttft_deadline_ms=req.ttft_deadline_ms,
    )
