"""The cloud side of P/D-Device: token budget, refined prompt, early stop by cancel."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pdserve.v1 import generation_service_pb2 as pb
from services.common.errors import error_info
from tests.cluster import Cluster
from tests.integration.conftest import reference

pytestmark = pytest.mark.integration


async def test_budget_caps_the_cloud_and_output_is_the_greedy_prefix(
        cluster: Cluster, tiny) -> None:  # type: ignore[no-untyped-def]
    _, tok, model = tiny
    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 3)
    got, _, last = await cluster.generate(prompt_token_ids=ids, max_tokens=30,
                                          device_assist=pb.DeviceAssist(token_budget=5))
    assert got == reference(model, ids, 5)
    assert last.finish_reason  # a normal end


async def test_refined_prompt_follows_the_first_token(cluster: Cluster, tiny) -> None:  # type: ignore[no-untyped-def]
    _, tok, model = tiny
    ids = tok.encode("Summarise this: " + "alpha beta gamma delta epsilon " * 8)
    msgs = [m async for m in cluster.stub.Generate(pb.GenerateRequest(
        prompt_token_ids=ids, max_tokens=8,
        device_assist=pb.DeviceAssist(token_budget=8, refine_ratio=0.5)))]
    assert len(msgs[0].token_ids) == 1  # t1 at once, alone
    refined = list(msgs[1].refined_prompt_token_ids)
    assert msgs[1].refine_method == "attention"
    assert len(refined) == -(-len(ids) // 2)
    # A subsequence of the prompt that keeps its tail.
    it = iter(ids)
    assert all(t in it for t in refined) and refined[-8:] == ids[-8:]
    assert [t for m in msgs for t in m.token_ids] == reference(model, ids, 8)


async def test_bad_assist_fields_are_invalid_argument(cluster: Cluster) -> None:
    for assist in (pb.DeviceAssist(token_budget=0), pb.DeviceAssist(token_budget=4,
                                                                    refine_ratio=1.5)):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await cluster.generate(prompt="hi", max_tokens=4, device_assist=assist)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(e.value).reason in ("INVALID_TOKEN_BUDGET", "INVALID_REFINE_RATIO")


async def test_device_stop_by_cancel_frees_everything(cluster: Cluster) -> None:
    call = cluster.stub.Generate(pb.GenerateRequest(
        prompt="stop early " * 20, max_tokens=400,
        device_assist=pb.DeviceAssist(token_budget=300, refine_ratio=0.5)))
    n = 0
    async for msg in call:
        n += len(msg.token_ids)
        if n >= 3:
            call.cancel()  # the device caught up: termination
            break
    for _ in range(100):  # the cancel propagates asynchronously
        stats = await cluster.kv_stats()
        decodes = await cluster.decode_stats()
        if stats.bytes_held == 0 and all(d.active == 0 for d in decodes):
            break
        await asyncio.sleep(0.05)
    assert stats.bytes_held == 0 and stats.entries == 0
    assert all(d.active == 0 for d in decodes)
