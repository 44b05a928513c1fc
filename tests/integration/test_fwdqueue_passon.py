"""The live twin of a simulator fix: an offer that reaches a gateway after its waiter was
admitted (the waiter left; its LEAVE has not reached Redis yet) goes to the next waiter at
once. The simulator used to drop such offers (before 64dd677) or hold them until the
request ended (before b61bf49); a lost wake-up leaves a prefill idle while newcomers queue
behind a non-empty queue, which collapsed forwarding in ``bench/sim`` at 67% load."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from services.cluster import slotoffer
from services.cluster.keys import wake_channel_prefix
from services.cluster.registry import connect
from services.gateway.fwdqueue import ForwardingQueue

pytestmark = pytest.mark.integration
SAFETY_POLL_S = 5.0  # long: a wake-up seen here comes from the passed-on offer


async def test_an_offer_arriving_after_its_waiter_left_goes_to_the_next_waiter_at_once(
        redis_url: str) -> None:
    client = connect(redis_url)
    gw_a = f"gwA-{uuid.uuid4().hex[:6]}"
    a = ForwardingQueue(client, gw_a, SAFETY_POLL_S)
    b = ForwardingQueue(client, f"gwB-{uuid.uuid4().hex[:6]}", SAFETY_POLL_S)
    await a.start()
    await b.start()
    g = f"q{uuid.uuid4().hex[:8]}"
    try:
        now = time.time() * 1000
        assert not await b.enter(g, "r1", now + 20_000)  # the next waiter, at gateway B
        # r0 was admitted and left gateway A; an OFFER that Redis ran before r0's LEAVE
        # still reaches A: published exactly as the OFFER script publishes it.
        gone = slotoffer.member("r0", gw_a)
        await client.publish(wake_channel_prefix(g) + gw_a,
                             f"{gone}\np0\n{slotoffer.now_ms()}")
        assert await asyncio.wait_for(b.wait(g, "r1"), 2) == "p0"
        # The passed-on offer woke it, not the (5 s) safety poll:
        assert a.stats.offers_passed_on == 1 and b.stats.safety_polls == 0
        await b.leave(g, "r1")
        await b.settled()
    finally:
        await a.close()
        await b.close()
        await client.aclose()
