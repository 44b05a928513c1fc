"""The device service in-process against an in-process cluster (tiny model)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import grpc
import pytest

from pdserve.v1 import device_service_pb2 as pb
from pdserve.v1 import device_service_pb2_grpc as pb_grpc
from services.device import main as device_main
from tests.cluster import Cluster
from tests.integration.conftest import reference

pytestmark = pytest.mark.integration
PROMPT = "The quick brown fox jumps over the lazy dog, and then it runs away. " * 6


@pytest.fixture(scope="module")
async def device(cluster: Cluster) -> AsyncIterator[pb_grpc.DeviceServiceStub]:
    # k = 20: the tiny model's prefill of ~400 tokens takes long enough on the "device"
    # that the cloud's first tokens are shown before it catches up.
    cfg = device_main.DeviceConfig(model="tiny", cloud_address=cluster.gateway[0].address,
                                   speed_factor=20.0, wan_rtt_ms=10.0, chunk_tokens=32)
    handles = await device_main.start(cfg)
    async with grpc.aio.insecure_channel(handles[0].address) as ch:
        yield pb_grpc.DeviceServiceStub(ch)
    await device_main.stop(*handles)


async def chat(stub: pb_grpc.DeviceServiceStub, **kw: object
               ) -> tuple[list[int], list[pb.DisplayedToken], pb.ChatSummary]:
    shown: list[pb.DisplayedToken] = []
    summary = None
    async for msg in stub.Chat(pb.ChatRequest(**kw)):  # type: ignore[arg-type]
        shown.extend(msg.tokens)
        if msg.HasField("summary"):
            summary = msg.summary
    assert summary is not None
    return [t.token_id for t in shown], shown, summary


async def test_pd_device_greedy_equals_generate(device, tiny) -> None:  # type: ignore[no-untyped-def]
    _, tok, model = tiny
    ids = tok.encode(PROMPT)
    got, shown, s = await chat(device, prompt=PROMPT, max_tokens=40, token_budget=30,
                               tau_ms=15, mode=pb.DEVICE_MODE_PD_DEVICE)
    print(f'\nhandoff {s.handoff_index}, ttft {s.ttft_ms:.0f} ms, max tpot {s.max_tpot_ms:.0f} ms')
    assert got == reference(model, ids, 40)
    assert not s.fallback
    assert 1 <= s.handoff_index < 40  # some tokens from each side
    assert [t.source for t in shown] == [pb.TOKEN_SOURCE_CLOUD] * s.handoff_index + \
        [pb.TOKEN_SOURCE_DEVICE] * (40 - s.handoff_index)
    times = [t.display_ms for t in shown]
    assert times == sorted(times) and s.ttft_ms == times[0]
    assert s.cloud_tokens >= s.handoff_index


async def test_baseline_modes_equal_generate(device, tiny) -> None:  # type: ignore[no-untyped-def]
    _, tok, model = tiny
    want = reference(model, tok.encode("Hello there"), 12)
    for mode in (pb.DEVICE_MODE_DEVICE_ONLY, pb.DEVICE_MODE_CLOUD_ONLY):
        got, shown, s = await chat(device, prompt="Hello there", max_tokens=12, mode=mode)
        assert got == want, pb.DeviceMode.Name(mode)
        assert s.mode == mode and not s.fallback
        src = pb.TOKEN_SOURCE_DEVICE if mode == pb.DEVICE_MODE_DEVICE_ONLY \
            else pb.TOKEN_SOURCE_CLOUD
        assert all(t.source == src for t in shown)


async def test_refined_prompt_is_used_and_stream_is_coherent(device, tiny) -> None:  # type: ignore[no-untyped-def]
    _, tok, model = tiny
    ids = tok.encode(PROMPT)
    got, _, s = await chat(device, prompt=PROMPT, max_tokens=30, token_budget=20,
                           refine_ratio=0.5, tau_ms=15, mode=pb.DEVICE_MODE_PD_DEVICE)
    assert s.refined_prompt_tokens == -(-len(ids) // 2) and s.refine_method == "attention"
    assert len(got) == 30
    c = s.handoff_index
    # The cloud part is the greedy answer to the full prompt; the device's follows P'.
    assert got[:c] == reference(model, ids, c)


async def test_unreachable_cloud_falls_back_to_local_prefill(cluster: Cluster, tiny) -> None:  # type: ignore[no-untyped-def]
    _, tok, model = tiny
    cfg = device_main.DeviceConfig(model="tiny", cloud_address="127.0.0.1:1",
                                   cloud_timeout_s=2.0)
    handles = await device_main.start(replace(cfg))
    try:
        async with grpc.aio.insecure_channel(handles[0].address) as ch:
            got, shown, s = await chat(pb_grpc.DeviceServiceStub(ch), prompt="Hi", max_tokens=8,
                                       mode=pb.DEVICE_MODE_PD_DEVICE, token_budget=4)
    finally:
        await device_main.stop(*handles)
    assert got == reference(model, tok.encode("Hi"), 8)
    assert "local prefill" in s.fallback
    assert all(t.source == pb.TOKEN_SOURCE_DEVICE for t in shown)


async def test_bad_requests_are_invalid_argument(device) -> None:  # type: ignore[no-untyped-def]
    for req in (pb.ChatRequest(), pb.ChatRequest(prompt="x", max_tokens=0),
                pb.ChatRequest(prompt="x", refine_ratio=2.0)):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in device.Chat(req):
                pass
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
