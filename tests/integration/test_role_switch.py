"""Role switching inside one worker process (services/worker): idle in Redis, assigned,
drained and switched without a restart; tokens stay identical to in-process generate;
in-flight requests finish (or end with ABORTED INSTANCE_DRAINED on a drain timeout),
and no KV is held afterwards."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from pdserve.v1 import admin_service_pb2 as apb
from pdserve.v1 import admin_service_pb2_grpc as apb_grpc
from pdserve.v1 import decode_service_pb2, decode_service_pb2_grpc
from services.cluster.registry import connect, list_instances
from services.common.errors import error_info
from services.common.runtime import ServiceRuntime, new_channel
from services.worker import main as worker_main
from services.worker.host import HostConfig, RoleHost
from tests.cluster import Cluster
from tests.integration.conftest import reference

pytestmark = pytest.mark.integration


@dataclass
class Worker:
    runtime: ServiceRuntime
    host: RoleHost
    stub: apb_grpc.WorkerControlServiceStub
    channel: grpc.aio.Channel


@pytest.fixture()
async def setup(redis_url: str) -> AsyncIterator[tuple[Cluster, list[Worker]]]:
    async with Cluster(redis_url, prefills=0, decodes=0) as c:
        workers = []
        for i, role in enumerate(("prefill", "decode", "idle")):
            rt, host = await worker_main.start(HostConfig(
                redis_url=redis_url, group=c.group, heartbeat_s=0.2, registry_ttl_s=3.0,
                grace_s=0.5, model="tiny", role=role, instance_id=f"w{i}-{c.group}",
                kv_pool_tokens=4096))
            ch = new_channel(rt.address)
            workers.append(Worker(rt, host, apb_grpc.WorkerControlServiceStub(ch), ch))
        for _, _, view in c.gateway_nodes:
            await view.refresh()
        try:
            yield c, workers
        finally:
            for w in workers:
                await w.channel.close()
                await worker_main.stop(w.runtime, w.host)


async def _roles(redis_url: str, group: str) -> dict[str, str]:
    client = connect(redis_url)
    try:
        return {i.instance_id.split("-")[0]: i.role for i in await list_instances(client, group)
                if i.instance_id.startswith("w")}
    finally:
        await client.aclose()


async def _refresh(c: Cluster) -> None:
    for _, _, view in c.gateway_nodes:
        await view.refresh()


async def test_idle_then_switch_both_ways_keeps_tokens_and_weights(
        setup: tuple[Cluster, list[Worker]], redis_url: str, tiny) -> None:  # type: ignore[no-untyped-def]
    c, (w0, w1, w2) = setup
    _, tok, model = tiny
    assert await _roles(redis_url, c.group) == {"w0": "prefill", "w1": "decode", "w2": "idle"}
    prompt = "The quick brown fox jumps over the lazy dog."
    want = reference(model, tok.encode(prompt), 12)
    assert (await c.generate(prompt=prompt, max_tokens=12))[0] == want

    # The idle one takes decode; the first decode becomes a prefill; the first prefill a decode.
    st = await w2.stub.Assign(apb.AssignRequest(role="decode", group=c.group))
    assert st.state == apb.WORKER_STATE_SERVING and st.weights_kept
    st = await w1.stub.Assign(apb.AssignRequest(role="prefill", group=c.group))
    assert st.role == "prefill" and st.weights_kept and st.last_switch_ms > 0
    st = await w0.stub.Assign(apb.AssignRequest(role="decode", group=c.group))
    assert st.role == "decode" and st.weights_kept and not st.pool_kept
    assert await _roles(redis_url, c.group) == {"w0": "decode", "w1": "prefill", "w2": "decode"}
    await _refresh(c)
    assert (await c.generate(prompt=prompt, max_tokens=12))[0] == want
    # Back again: the pool w1 attached as a decode is kept.
    await w0.stub.Assign(apb.AssignRequest(role="prefill", group=c.group))
    st = await w1.stub.Assign(apb.AssignRequest(role="decode", group=c.group))
    assert st.pool_kept and st.weights_kept and st.switches_total == 2
    await _refresh(c)
    assert (await c.generate(prompt=prompt, max_tokens=12))[0] == want
    # Idempotent: the same assignment again is a no-op.
    again = await w1.stub.Assign(apb.AssignRequest(role="decode", group=c.group))
    assert again.switches_total == 2
    # Release to the spare pool, and a stale fence is refused.
    await w2.stub.Drain(apb.DrainRequest(fence=5))
    st = await w2.stub.Release(apb.ReleaseRequest(fence=5))
    assert st.state == apb.WORKER_STATE_IDLE
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await w2.stub.Assign(apb.AssignRequest(role="decode", group=c.group, fence=4))
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(ei.value)
    assert info is not None and info.reason == "STALE_FENCE"
    assert (await c.kv_stats()).bytes_held == 0


async def test_switch_under_load_loses_no_request(
        setup: tuple[Cluster, list[Worker]], tiny) -> None:  # type: ignore[no-untyped-def]
    c, (_, w1, w2) = setup
    _, tok, model = tiny
    await w2.stub.Assign(apb.AssignRequest(role="decode", group=c.group))
    await _refresh(c)
    prompts = [f"request {i} asks about the weather" for i in range(6)]
    tasks = [asyncio.create_task(c.generate(prompt=p, max_tokens=24)) for p in prompts]
    await asyncio.sleep(0.3)
    # Drain the first decode while requests stream through it: they finish there, new ones
    # go to the other decode; then it switches to prefill.
    st = await w1.stub.Assign(apb.AssignRequest(role="prefill", group=c.group, timeout_s=60))
    assert st.aborted_on_drain_total == 0
    results = await asyncio.gather(*tasks)
    for p, (got, _, _) in zip(prompts, results, strict=True):
        assert got == reference(model, tok.encode(p), 24)
    assert (await c.kv_stats()).bytes_held == 0


async def test_drain_timeout_ends_requests_with_a_clear_status(
        setup: tuple[Cluster, list[Worker]]) -> None:
    c, (_, w1, _) = setup
    # Long answers (the tiny model's context is 1024), so that some are still streaming
    # through w1 when the drain's short timeout ends.
    tasks = [asyncio.create_task(c.generate(prompt=f"long story {i}", max_tokens=960))
             for i in range(3)]
    for _ in range(3000):  # until a request streams through w1 (a loaded CI box is slow)
        if w1.host.in_flight:
            break
        await asyncio.sleep(0.02)
    assert w1.host.in_flight
    st = await w1.stub.Drain(apb.DrainRequest(timeout_s=0.05))
    assert st.state == apb.WORKER_STATE_DRAINED
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    reasons = []
    for o in outcomes:
        if isinstance(o, grpc.aio.AioRpcError):
            info = error_info(o)
            reasons.append(info.reason if info else o.code().name)
    # A request still in its prefill when the only decode left routing finds none in the
    # group (UNAVAILABLE NO_DECODE, its staged KV released): also a clear status. CI saw
    # two of the three end so once, the prefills being slower than the drain there.
    assert reasons and set(reasons) <= {"INSTANCE_DRAINED", "DECODE_SLOTS_FULL", "NO_DECODE"}
    assert "INSTANCE_DRAINED" in reasons
    async with grpc.aio.insecure_channel(w1.runtime.address) as ch:
        stats = await decode_service_pb2_grpc.DecodeServiceStub(ch).GetDecodeStats(
            decode_service_pb2.GetDecodeStatsRequest())
    assert stats.kv_bytes_held == 0 and stats.active == 0
    await asyncio.sleep(0.5)
    assert (await c.kv_stats()).bytes_held == 0
