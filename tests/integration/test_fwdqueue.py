"""The forwarding queue's wake-up against a real Redis: a freed slot is offered to the
earliest-deadline waiter across gateways in one round trip, with no polling."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from services.cluster import slotoffer
from services.cluster.keys import gateways_key, offered_key, queue_key
from services.cluster.registry import connect
from services.gateway.fwdqueue import ForwardingQueue
from services.gateway.scheduling import Waiting, offer_to

pytestmark = pytest.mark.integration
SAFETY_POLL_S = 5.0  # long: any wake-up these tests see comes from an offer


@pytest.fixture()
async def gateways(redis_url: str) -> AsyncIterator[tuple[object, ForwardingQueue,
                                                          ForwardingQueue]]:
    client = connect(redis_url)
    a = ForwardingQueue(client, f"gwA-{uuid.uuid4().hex[:6]}", SAFETY_POLL_S)
    b = ForwardingQueue(client, f"gwB-{uuid.uuid4().hex[:6]}", SAFETY_POLL_S)
    await a.start()
    await b.start()
    try:
        yield client, a, b
    finally:
        await a.close()
        await b.close()
        await client.aclose()


def _group() -> str:
    return f"q{uuid.uuid4().hex[:8]}"


async def test_a_freed_slot_goes_to_the_earliest_deadline_waiter_across_gateways(
        gateways: tuple[object, ForwardingQueue, ForwardingQueue]) -> None:
    client, a, b = gateways
    g = _group()
    now = time.time() * 1000
    assert not await a.enter(g, "r-late", now + 30_000)  # no prefill claimed
    assert not await b.enter(g, "r-first", now + 10_000)  # no prefill claimed
    assert not await a.enter(g, "r-mid", now + 20_000)  # no prefill claimed
    waits = {rid: asyncio.create_task(q.wait(g, rid))
             for rid, q in (("r-late", a), ("r-first", b), ("r-mid", a))}
    order = []
    for prefill in ("p0", "p1", "p2"):
        assert await slotoffer.offer_slot(client, g, prefill) is not None
        done, _ = await asyncio.wait(waits.values(), timeout=2,
                                     return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1, "one freed slot wakes exactly one waiter"
        rid = next(r for r, t in waits.items() if t in done)
        assert waits.pop(rid).result() == prefill  # told which prefill to ask first
        order.append(rid)
    assert order == ["r-first", "r-mid", "r-late"]
    for rid, q in (("r-late", a), ("r-first", b), ("r-mid", a)):
        await q.leave(g, rid)
    await b.settled()  # removals go to Redis in the background
    assert await a.depth(g) == 0


async def test_an_offer_to_a_request_that_left_is_passed_on(
        gateways: tuple[object, ForwardingQueue, ForwardingQueue]) -> None:
    client, a, b = gateways
    g = _group()
    now = time.time() * 1000
    await a.enter(g, "r0", now + 10_000)
    await b.enter(g, "r1", now + 20_000)
    assert await slotoffer.offer_slot(client, g, "p0") is not None  # r0's, while it tries
    await asyncio.sleep(0.05)
    await a.leave(g, "r0")  # admitted elsewhere: the offer it never used goes on
    assert await asyncio.wait_for(b.wait(g, "r1"), 2) == "p0"
    assert a.stats.offers_passed_on == 1
    await b.leave(g, "r1")


async def test_a_slot_freed_just_before_the_request_enters_is_claimed(
        gateways: tuple[object, ForwardingQueue, ForwardingQueue]) -> None:
    client, a, _ = gateways
    g = _group()
    assert await slotoffer.offer_slot(client, g, "p0") is None  # nobody waiting yet
    assert await a.enter(g, "r0", time.time() * 1000 + 10_000) == "p0"
    await a.leave(g, "r0")
    assert await slotoffer.offer_slot(client, g, "p1") is None
    await asyncio.sleep(slotoffer.FREE_TTL_MS / 1000 + 0.1)  # long taken by someone else
    assert not await a.enter(g, "r1", time.time() * 1000 + 10_000)  # no prefill claimed
    await a.leave(g, "r1")


async def test_entries_of_a_dead_gateway_and_past_deadlines_get_no_offer(
        gateways: tuple[object, ForwardingQueue, ForwardingQueue]) -> None:
    client, a, _ = gateways
    g = _group()
    now = time.time() * 1000
    # A gateway that died with a request queued: its liveness lapsed long ago.
    await slotoffer.enter(client, g, slotoffer.member("orphan", "gw-dead"), now + 5_000,
                          "gw-dead", int(now - 1))
    await slotoffer.enter(client, g, slotoffer.member("late", a._gateway_id), now - 1,
                          a._gateway_id, int(now + 60_000))
    await a.enter(g, "r0", now + 20_000)
    assert await slotoffer.offer_slot(client, g, "p0") == slotoffer.member("r0", a._gateway_id)
    assert await asyncio.wait_for(a.wait(g, "r0"), 2) == "p0"
    await a.leave(g, "r0")
    assert await a.depth(g) == 0  # the orphan and the expired entry were pruned


async def _r0_offered_p0_before_r1(client: object, a: ForwardingQueue,
                                   b: ForwardingQueue) -> str:
    """A new group where r0 (gateway a) and r1 (gateway b, later deadline) wait, and a
    freed p0 has been offered to r0."""
    g = _group()
    now = time.time() * 1000
    await a.enter(g, "r0", now + 10_000)
    await b.enter(g, "r1", now + 20_000)
    await slotoffer.offer_slot(client, g, "p0")
    assert await asyncio.wait_for(a.wait(g, "r0"), 2) == "p0"
    return g


async def test_a_waiter_that_lost_its_offered_slot_keeps_its_place(
        gateways: tuple[object, ForwardingQueue, ForwardingQueue]) -> None:
    client, a, b = gateways
    g = await _r0_offered_p0_before_r1(client, a, b)
    # r0's try was rejected (someone took the slot): it waits again, still first.
    again = asyncio.create_task(a.wait(g, "r0"))
    other = asyncio.create_task(b.wait(g, "r1"))
    await asyncio.sleep(0.05)
    await slotoffer.offer_slot(client, g, "p1")
    assert await asyncio.wait_for(again, 2) == "p1"
    assert not other.done()
    other.cancel()
    await a.leave(g, "r0")
    await b.leave(g, "r1")


async def test_offers_wake_waiters_far_sooner_than_the_safety_poll(
        gateways: tuple[object, ForwardingQueue, ForwardingQueue]) -> None:
    """From the prefill's offer call to the waiter running again, on one host."""
    client, a, _ = gateways
    g = _group()
    for i in range(200):
        await a.enter(g, f"r{i}", time.time() * 1000 + 10_000)
        waiter = asyncio.create_task(a.wait(g, f"r{i}"))
        await asyncio.sleep(0)
        await slotoffer.offer_slot(client, g, "p0")
        assert await asyncio.wait_for(waiter, 2) == "p0"
        await a.leave(g, f"r{i}")
    wake = sorted(a.stats.wake_ms)
    p50, p99 = statistics.median(wake), wake[int(0.99 * len(wake))]
    print(f"offer -> waiter running: p50 {p50:.2f} ms, p99 {p99:.2f} ms (n={len(wake)})")
    assert a.stats.safety_polls == 0
    assert p50 < SAFETY_POLL_S * 1000 / 100  # a ratio: an offer, not a poll, woke them


async def test_the_offer_script_runs_the_policy_cores_offer_to_rule(redis_url: str) -> None:
    """The OFFER script (Lua, in Redis) and ``scheduling.offer_to`` (what the simulator
    runs) pick the same entry: deadlines with ties, expired entries, held and lapsed
    offers."""
    rng = random.Random(5)
    client = connect(redis_url)
    gw = "gw-live"
    try:
        for _ in range(150):
            g = _group()
            now = time.time() * 1000
            await client.hset(gateways_key(g), gw, now + 60_000)
            entries, offered = [], {}
            for rid in rng.sample(range(1000), rng.randrange(0, 8)):
                e = Waiting(f"r{rid:03d}", gw, now + rng.choice([-1e3, 2e3, 2e3, 5e3, 9e3]))
                entries.append(e)
                await client.zadd(queue_key(g), {slotoffer.member(e.request_id, gw):
                                                 e.deadline_ms})
                if rng.random() < 0.4:
                    offered[e.request_id] = now + rng.choice([-500.0, 60_000.0])
                    await client.hset(offered_key(g), slotoffer.member(e.request_id, gw),
                                      offered[e.request_id])
            want = offer_to(entries, offered, now)
            got = await slotoffer.offer_slot(client, g, "p0")
            assert got == (slotoffer.member(want.request_id, gw) if want else None)
    finally:
        await client.aclose()


async def test_an_empty_queue_costs_no_round_trip_and_other_gateways_waiters_are_seen(
        gateways: tuple[object, ForwardingQueue, ForwardingQueue],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The queue-state channel: a newcomer at a gateway learns "empty" without asking
    Redis, and still joins (not jumps) a queue another gateway's request waits in."""
    client, a, b = gateways
    g = _group()
    assert await a.depth(g) == 0  # first ask: one ZCARD, then "empty" is known
    asked = 0
    zcard = client.zcard  # type: ignore[attr-defined]

    async def counting(*args: object) -> int:
        nonlocal asked
        asked += 1
        return int(await zcard(*args))

    monkeypatch.setattr(client, "zcard", counting)
    assert [await a.depth(g) for _ in range(20)] == [0] * 20
    assert asked == 0
    await b.enter(g, "r0", time.time() * 1000 + 10_000)
    for _ in range(200):  # the "1" event arrives over pub/sub
        if await a.depth(g) > 0:
            break
        await asyncio.sleep(0.005)
    assert await a.depth(g) == 1
    await b.leave(g, "r0")
    for _ in range(200):
        if a._nonempty.get(g, (True, 0))[0] is False:
            break
        await asyncio.sleep(0.005)
    before = asked
    assert await a.depth(g) == 0 and asked == before


async def test_without_redis_the_gateway_offers_freed_slots_to_its_own_earliest_deadline(
        tmp_path: object) -> None:
    """Degraded mode: a prefill stream of this gateway ended, so that prefill has a free
    slot; the earliest-deadline local waiter gets it at once, by the same rule."""
    client = connect(f"unix://{tmp_path}/nothing-listens.sock")
    q = ForwardingQueue(client, "gw-alone", SAFETY_POLL_S, degraded_poll_s=SAFETY_POLL_S)
    await q.start()
    try:
        assert q.degraded
        now = time.time() * 1000
        for rid, dl in (("late", 30_000), ("first", 10_000), ("mid", 20_000)):
            assert not await q.enter("g", rid, now + dl)  # no prefill claimed
        assert await q.depth("g") == 3 and await q.rank("g", "mid") == 1
        waits = {rid: asyncio.create_task(q.wait("g", rid)) for rid in ("late", "first", "mid")}
        await asyncio.sleep(0.01)
        order = []
        for prefill in ("p0", "p1"):
            q.on_prefill_done("g", prefill)
            done, _ = await asyncio.wait(waits.values(), timeout=1,
                                         return_when=asyncio.FIRST_COMPLETED)
            rid = next(r for r, t in waits.items() if t in done)
            assert waits.pop(rid).result() == prefill
            order.append(rid)
        assert order == ["first", "mid"]
        await q.leave("g", "first")
        await q.leave("g", "mid")
        q.on_prefill_done("g", "p2")  # nobody left but "late", who is still waiting
        assert await asyncio.wait_for(waits["late"], 1) == "p2"
        await q.leave("g", "late")
        q.on_prefill_done("g", "p3")  # nobody waits: remembered for a newcomer
        assert await q.enter("g", "new", now + 5_000) == "p3"
        await q.leave("g", "new")
    finally:
        await q.close()
        await client.aclose()


async def test_a_newcomer_behind_entries_that_all_hold_offers_probes_at_once(
        gateways: tuple[object, ForwardingQueue, ForwardingQueue]) -> None:
    """Entries that hold an offer are being admitted and are about to leave: a newcomer
    behind only such entries must not wait for a slot to free (the prefills may be idle);
    behind one that waits for real, it waits."""
    client, a, b = gateways
    g = _group()
    now = time.time() * 1000
    await a.enter(g, "r0", now + 10_000)
    assert await slotoffer.offer_slot(client, g, "p0") is not None  # r0 is being admitted
    assert await b.enter(g, "r1", now + 20_000) == ""  # probe now
    await a.enter(g, "r2", now + 15_000)  # waits for real, ahead of the next newcomer
    assert await b.enter(g, "r3", now + 30_000) is None
    for rid, q in (("r0", a), ("r1", b), ("r2", a), ("r3", b)):
        await q.leave(g, rid)


async def test_a_request_a_prefill_accepted_draws_no_more_offers(
        gateways: tuple[object, ForwardingQueue, ForwardingQueue],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Accepted = off the queue at once: while its prefill computes (longer than an offer
    mark lasts), freed slots go to the requests still waiting."""
    client, a, b = gateways
    monkeypatch.setattr(slotoffer, "OFFER_TTL_MS", 50)
    g = await _r0_offered_p0_before_r1(client, a, b)
    a.drop(g, "r0")  # the prefill accepted r0; its first token is seconds away
    await a.settled()
    await asyncio.sleep(0.1)  # longer than the offer mark
    assert await slotoffer.offer_slot(client, g, "p1") == slotoffer.member("r1", b._gateway_id)
    assert await asyncio.wait_for(b.wait(g, "r1"), 2) == "p1"
    await a.leave(g, "r0")  # idempotent
    await b.leave(g, "r1")


async def test_an_offer_during_enter_keeps_its_mark_so_the_next_offer_still_comes(
        gateways: tuple[object, ForwardingQueue, ForwardingQueue],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An offer that reaches the gateway while its ENTER is still on the wire marks the
    entry in Redis. If the try on it is then rejected (the slot was taken meanwhile), the
    waiter must clear that mark before it waits again; otherwise every offer skips it for
    OFFER_TTL_MS and it waits for the safety poll (seen as ~1 s stalls, 1 request in
    ~1,500 at c = 8 with 4 slots)."""
    client, a, _ = gateways
    g = _group()
    m = slotoffer.member("r-raced", a._gateway_id)
    real_enter = slotoffer.enter

    async def enter_then_offer(*args: object, **kw: object) -> str | None:
        got = await real_enter(*args, **kw)  # type: ignore[arg-type]
        assert await slotoffer.offer_slot(client, g, "p-raced") == m  # the offer, in flight
        for _ in range(200):
            if a._waiters[m].offers:
                break
            await asyncio.sleep(0.01)
        return got

    monkeypatch.setattr(slotoffer, "enter", enter_then_offer)
    assert not await a.enter(g, "r-raced", time.time() * 1000 + 30_000)
    monkeypatch.undo()
    assert await a.wait(g, "r-raced") == "p-raced"  # the offer; its try is then rejected
    waiting = asyncio.create_task(a.wait(g, "r-raced"))  # waits again, eligible again
    await asyncio.sleep(0.1)  # far below OFFER_TTL_MS: a mark left behind would still hold
    assert await slotoffer.offer_slot(client, g, "p-next") == m
    assert await asyncio.wait_for(waiting, 2.0) == "p-next"
    await a.leave(g, "r-raced")
