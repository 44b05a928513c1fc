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
    # A hand-off inside the answer, or the test below proves nothing about either side.
    assert 0 < c < len(got), c
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


async def test_seeded_sampling_is_the_same_across_the_hand_off(device, tiny) -> None:  # type: ignore[no-untyped-def]
    _, tok, model = tiny
    kw = dict(prompt=PROMPT, max_tokens=40, temperature=1.2, top_p=0.95, seed=1234)
    pd, _, s = await chat(device, token_budget=30, tau_ms=15,
                          mode=pb.DEVICE_MODE_PD_DEVICE, **kw)
    assert 1 <= s.handoff_index < 40 and not s.fallback  # tokens from both sides
    cloud, _, _ = await chat(device, mode=pb.DEVICE_MODE_CLOUD_ONLY, **kw)
    local, _, _ = await chat(device, mode=pb.DEVICE_MODE_DEVICE_ONLY, **kw)
    # Token i is drawn with (seed, i) on whichever side makes it: one answer for all modes.
    assert pd == cloud == local
    assert pd != reference(model, tok.encode(PROMPT), 40)  # and it really was sampled
    other, _, _ = await chat(device, mode=pb.DEVICE_MODE_DEVICE_ONLY,
                             **{**kw, "seed": 99})
    assert other != pd


def stop_between(tok, ref: list[int], lo: int, hi: int) -> str:  # type: ignore[no-untyped-def]
    """A stop string whose first occurrence in the answer's text starts between the text
    of tokens ``lo`` and ``hi`` (the tiny model's answers are arbitrary bytes)."""
    full = tok.decode(ref)
    for size in (4, 3, 2):
        for i in range(len(tok.decode(ref[:lo])), len(tok.decode(ref[:hi]))):
            cand = full[i:i + size]
            if len(cand) == size and "\ufffd" not in cand and full.find(cand) == i:
                return cand
    raise AssertionError(f"no usable stop string in {full!r}")


async def test_stop_string_ends_the_answer_on_either_side(device, tiny) -> None:  # type: ignore[no-untyped-def]
    _, tok, model = tiny
    prompt = "Once upon a time there was a little girl who lived near the forest. " * 5
    ref = reference(model, tok.encode(prompt), 40)
    full_text = tok.decode(ref)
    for mode, lo, hi in ((pb.DEVICE_MODE_PD_DEVICE, 30, 38), (pb.DEVICE_MODE_CLOUD_ONLY, 4, 12)):
        stop = stop_between(tok, ref, lo, hi)
        want = full_text[:full_text.find(stop)]
        texts: list[str] = []
        shown: list[int] = []
        summary = None
        async for msg in device.Chat(pb.ChatRequest(
                prompt=prompt, max_tokens=40, token_budget=24, tau_ms=15, mode=mode,
                stop=[stop, "never appears \u2603"])):
            texts.append(msg.text)
            shown.extend(t.token_id for t in msg.tokens)
            if msg.HasField("summary"):
                summary = msg.summary
        assert summary is not None and summary.finish_reason == 1  # FINISH_REASON_STOP
        assert "".join(texts) == want, pb.DeviceMode.Name(mode)
        assert shown == ref[:len(shown)] and len(shown) < 40
        assert summary.tokens == len(shown)
        if mode == pb.DEVICE_MODE_PD_DEVICE:  # the stop fell on the device's side
            assert 1 <= summary.handoff_index < len(shown)


async def test_a_fleet_serves_concurrent_chats_each_on_its_own_device(cluster: Cluster) -> None:
    import asyncio

    cfg = device_main.DeviceConfig(model="tiny", engine="mock", device_profile="phone",
                                   cloud_address=cluster.gateway[0].address, wan_rtt_ms=20.0,
                                   fleet_size=4, fleet_spread=0.3, chunk_tokens=64)
    handles = await device_main.start(cfg)
    try:
        speeds = [d.engine.tpot for d in handles[1].devices]
        assert speeds == sorted(speeds) and speeds[-1] == pytest.approx(1.3 * speeds[0])
        assert len({d.relay.address for d in handles[1].devices}) == 4  # a link each
        async with grpc.aio.insecure_channel(handles[0].address) as ch:
            stub = pb_grpc.DeviceServiceStub(ch)
            results = await asyncio.gather(*(
                chat(stub, prompt=PROMPT * 2, max_tokens=48, device_index=i,
                     mode=pb.DEVICE_MODE_PD_DEVICE, token_budget=24, tau_ms=40)
                for i in range(4)))
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await chat(stub, prompt="x", device_index=4)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await device_main.stop(*handles)
    for i, (got, shown, s) in enumerate(results):
        assert s.device_index == i and len(got) == 48 and not s.fallback
        assert 1 <= s.handoff_index < 48
        times = [t.display_ms for t in shown]
        assert times == sorted(times)
