"""P/D-Device requests at the gateway (docs/pd-device.md, "Cloud side").

A GenerateRequest with ``device_assist`` is an ordinary request with two changes:
  - token budget N: the cloud generates at most N tokens (first included), so its
    decode slot and KV are freed after N steps at the latest;
  - refine ratio rho in (0, 1): the prefill returns P' (``refined`` event, right after
    first_token) and the gateway streams it in the message after the first token.
Early termination needs nothing here: the device cancels the call once it has caught
up, and a cancel already frees the prefill, decode and kvstore work of the request.
"""

from __future__ import annotations

import dataclasses
import math

import grpc

from pdserve.v1 import generation_service_pb2 as pb
from services.common.errors import InvalidArgument, Unavailable, from_rpc_error
from services.gateway.validation import ValidRequest


def refine_ratio(request: pb.GenerateRequest) -> float:
    """rho asked for, 0 for none; INVALID_ARGUMENT when out of range."""
    if not request.HasField("device_assist"):
        return 0.0
    a = request.device_assist
    if a.token_budget < 1:
        raise InvalidArgument("device_assist.token_budget must be >= 1",
                              reason="INVALID_TOKEN_BUDGET")
    rho = float(a.refine_ratio)
    if not (math.isfinite(rho) and 0.0 <= rho <= 1.0):
        raise InvalidArgument(f"device_assist.refine_ratio must be in [0, 1], got {rho}",
                              reason="INVALID_REFINE_RATIO")
    return 0.0 if rho >= 1.0 else rho


def apply_budget(request: pb.GenerateRequest, req: ValidRequest) -> ValidRequest:
    """The request with max_tokens capped by the token budget N."""
    if not request.HasField("device_assist"):
        return req
    return dataclasses.replace(req, max_tokens=min(req.max_tokens,
                                                   int(request.device_assist.token_budget)))


async def read_refined(call: grpc.aio.UnaryStreamCall, instance_id: str
                       ) -> pb.GenerateResponse:
    """The prefill's ``refined`` event (it directly follows first_token), as the
    client message that carries P'. The call stays open for the KV handoff."""
    try:
        async for ev in call:
            if ev.WhichOneof("event") == "refined":
                return pb.GenerateResponse(
                    refined_prompt_token_ids=list(ev.refined.token_ids),
                    refine_method=ev.refined.method)
            if ev.WhichOneof("event") == "kv_ready":
                break
    except grpc.aio.AioRpcError as e:
        raise from_rpc_error(e, f"prefill {instance_id} refined prompt") from e
    raise Unavailable(f"prefill {instance_id} did not return the refined prompt",
                      reason="REFINED_PROMPT_MISSING")
