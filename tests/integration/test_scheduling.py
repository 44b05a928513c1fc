"""P/D-Serve scheduling in the real services: forwarding upon rejection, the shared
Redis queue, multiple gateways, scenario-group isolation."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import grpc
import pytest

from pdserve.v1 import common_pb2, generation_service_pb2
from services.common.errors import error_info
from tests.cluster import Cluster

pytestmark = pytest.mark.integration
SLOW = {"slots": 1, "emulate_prefill_ms_per_token": 2.0}  # 800 tokens ~ 1.6 s, 100 ~ 0.2 s


async def _first_token(cluster: Cluster, ids: list[int], order: list[str], name: str,
                       gateway: int = 0) -> None:
    """Appends ``name`` to ``order`` when the request's first token arrives."""
    stub = cluster.stubs[gateway]
    async for msg in stub.Generate(generation_service_pb2.GenerateRequest(
            prompt_token_ids=ids, max_tokens=2)):
        if msg.token_ids:
            order.append(name)
            return
    raise AssertionError("no token")


async def _paper_example(cluster: Cluster) -> list[str]:
    """One long prompt and three short ones at once, two prefills with b_p = 1: the order
    in which their first tokens arrive (the long one takes ~1.6 s of prefill, a short one
    ~0.2 s, so the order says who waited behind whom, whatever the machine's speed)."""
    order: list[str] = []
    long = asyncio.create_task(_first_token(cluster, [5] * 800, order, "long"))
    await asyncio.sleep(0.05)  # the long one is admitted first, as in the paper's figure
    await asyncio.gather(*(_first_token(cluster, [6 + i] * 100, order, f"short{i}")
                           for i in range(3)))
    await long
    return order


async def test_forwarding_no_short_prompt_waits_behind_the_long_one(redis_url: str) -> None:
    async with Cluster(redis_url, prefills=2, worker_overrides=SLOW) as c:
        order = await _paper_example(c)
        assert order[-1] == "long", order  # every short one was served around it
        stats = c.gateway[1].admission.stats
        assert stats.rejections_total >= 1 and stats.forwarded_total >= 1


async def test_round_robin_local_queue_parks_a_short_prompt_behind_the_long_one(
    redis_url: str,
) -> None:
    async with Cluster(redis_url, prefills=2, worker_overrides=SLOW,
                       gateway_overrides={"scheduler": "rr-queue"}) as c:
        order = await _paper_example(c)
        # The baseline's failure: round robin parked a short prompt in the long one's
        # local queue, so its first token came after the long one's.
        assert order[-1] != "long", order
        assert sum(s.accepted_total for s in await c.prefill_stats()) == 4


async def test_requests_past_their_deadline_in_the_queue_end_with_deadline_exceeded(
    redis_url: str,
) -> None:
    async with Cluster(redis_url, prefills=1, worker_overrides=SLOW) as c:
        busy = asyncio.create_task(_first_token(c, [5] * 600, [], "busy"))  # the slot, ~1.2 s
        await asyncio.sleep(0.05)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.generate(prompt_token_ids=[7] * 50, max_tokens=2, ttft_deadline_ms=300)
        assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await busy
        await asyncio.sleep(0.1)
        queue = c.gateway[1].admission.queue
        assert queue is not None and await queue.depth(c.group) == 0  # nothing left queued
        assert (await c.kv_stats()).bytes_held == 0


async def test_a_prefill_that_cannot_meet_the_deadline_ends_the_request_before_compute(
    redis_url: str,
) -> None:
    async with Cluster(redis_url, prefills=1, worker_overrides=SLOW) as c:
        await c.generate(prompt_token_ids=[5] * 100, max_tokens=2)  # the prefill learns its speed
        with pytest.raises(grpc.aio.AioRpcError) as exc:  # >= 1.2 s of prefill, 0.5 s allowed
            await c.generate(prompt_token_ids=[7] * 600, max_tokens=2, ttft_deadline_ms=500)
        assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert error_info(exc.value).reason == "DEADLINE_UNREACHABLE"  # type: ignore[union-attr]
        assert "needs at least" in (exc.value.details() or "")
        (stats,) = await c.prefill_stats()
        # Ended before compute: never accepted, no KV reserved, not at the deadline.
        assert stats.unreachable_total == 1 and stats.accepted_total == 1
        await c.generate(prompt_token_ids=[8] * 50, max_tokens=2, ttft_deadline_ms=5000)
        assert (await c.kv_stats()).bytes_held == 0


async def test_two_gateways_share_one_queue_no_request_lost_or_served_twice(
    redis_url: str,
) -> None:
    async with Cluster(redis_url, prefills=1, gateways=2,
                       worker_overrides={"slots": 1, "emulate_prefill_ms_per_token": 0.5}) as c:
        rids = [f"mg-{i}-{uuid.uuid4().hex[:6]}" for i in range(8)]
        results = await asyncio.gather(*(
            c.generate(gateway=i % 2, prompt_token_ids=[9 + i] * 100, max_tokens=3,
                       request_id=rid) for i, rid in enumerate(rids)))
        assert [r[2].request_id for r in results] == rids  # each stream got its own answer
        prefill = (await c.prefill_stats())[0]
        assert prefill.accepted_total == 8 and prefill.completed_total == 8  # once each
        queued = sum(n[1].admission.stats.queued_total for n in c.gateway_nodes)
        assert queued >= 2  # both gateways' requests really waited in the shared queue
        for node in c.gateway_nodes:
            assert node[1].admission.queue is not None
        assert await c.gateway_nodes[0][1].admission.queue.depth(c.group) == 0  # type: ignore[union-attr]


async def test_scenario_groups_are_isolated(redis_url: str) -> None:
    async with Cluster(redis_url) as a, Cluster(redis_url) as b:
        await a.gateway[2].refresh()
        await a.generate(prompt="to group b", scenario=b.group, max_tokens=3)
        await a.generate(prompt="to group a", max_tokens=3)
        (pa,), (pb,) = await a.prefill_stats(), await b.prefill_stats()
        assert pa.accepted_total == 1 and pb.accepted_total == 1
        da, db = await a.decode_stats(), await b.decode_stats()
        assert sum(d.completed_total for d in da) == 1 and sum(d.completed_total for d in db) == 1


async def test_unknown_scenario_goes_to_default_or_is_refused(redis_url: str) -> None:
    async with Cluster(redis_url, gateway_overrides={"unknown_scenario": "refuse"}) as c:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.generate(prompt="hi", scenario="no-such-group", max_tokens=2)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(exc.value).reason == "UNKNOWN_SCENARIO"  # type: ignore[union-attr]
    async with Cluster(redis_url) as c:
        ids, _, _ = await c.generate(prompt="hi", scenario="no-such-group", max_tokens=2)
        assert len(ids) >= 1


async def test_a_full_kvstore_makes_prefill_reject_and_the_request_is_forwarded(
    redis_url: str,
) -> None:
    from services.kv.layout import kv_nbytes
    from services.model.info import ModelInfo

    info = ModelInfo.load("tiny")
    one = kv_nbytes(info.num_layers, info.num_kv_heads, info.head_dim, 200, info.kv_dtype)
    async with Cluster(redis_url, prefills=2, kvstore_overrides={"capacity_bytes": one},
                       worker_overrides={"emulate_prefill_ms_per_token": 1.0}) as c:
        results = await asyncio.gather(*(
            c.generate(prompt_token_ids=[11 + i] * 200, max_tokens=3) for i in range(2)))
        assert all(len(ids) >= 1 for ids, _, _ in results)
        stats = await c.prefill_stats()
        assert sum(s.rejected_total for s in stats) >= 1  # REJECT_REASON_KV_CAPACITY
        assert sum(s.completed_total for s in stats) == 2
        assert (await c.kv_stats()).bytes_held == 0


async def test_mock_engine_cluster_moves_kv_of_the_modelled_size(
    redis_url: str, tmp_path: Path
) -> None:
    from services.model.profile import profile_path

    prof = json.loads(profile_path("scaled-gpu").read_text())
    prof["time_scale"] = 0.1
    path = tmp_path / "fast.json"
    path.write_text(json.dumps(prof))
    async with Cluster(redis_url, model=f"mock:{path}") as c:
        ids, text, last = await c.generate(prompt_token_ids=[20] * 300, max_tokens=12)
        assert len(ids) == 12 and last.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert text  # mock tokens are printable bytes
        again, _, _ = await c.generate(prompt_token_ids=[20] * 300, max_tokens=12)
        assert again == ids  # deterministic
        stats = await c.kv_stats()
        assert stats.bytes_in_total == 2 * (512 + 300 * 12 * 1024)  # real bytes, real size
        assert stats.bytes_held == 0


async def test_when_every_decode_is_full_the_request_waits_for_a_slot(redis_url: str) -> None:
    async with Cluster(redis_url, prefills=1, decodes=1, worker_overrides={"slots": 1}) as c:
        results = await asyncio.gather(*(
            c.generate(prompt_token_ids=[30 + i] * 20, max_tokens=40) for i in range(3)))
        done = (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)
        assert all(ids and last.finish_reason in done for ids, _, last in results), results
        (d,) = await c.decode_stats()
        decoded = [len(ids) - 1 for ids, _, _ in results if len(ids) > 1]
        assert d.completed_total == len(decoded) and d.failed_total == 0
        # One slot: the decode never batched two requests, so it ran one step per token
        # it produced; the others waited (their KV staged) until the slot freed.
        assert d.steps_total == sum(decoded), (d.steps_total, decoded)
        assert (await c.kv_stats()).bytes_held == 0
