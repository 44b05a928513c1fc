"""A freed prefill slot, offered to the earliest-deadline waiter of the group's queue.

The forwarding queue (``services/gateway/fwdqueue.py``) lives in Redis, shared by every
gateway of a group. Its steps are Lua scripts over one group's keys (one hash tag, so
they are atomic on one Redis Cluster node), shared here by the prefill (OFFER) and the
gateway (ENTER, LEAVE, RESYNC):

  OFFER  a prefill that frees a slot: drop expired entries and entries of gateways whose
         liveness lapsed, mark the earliest-deadline entry not yet offered as offered, and
         PUBLISH "<member>\\n<prefill>\\n<unix ms>" to its gateway's wake channel. One
         round trip from the prefill, one pub/sub hop to the gateway: no polling. With no
         one waiting, the slot is remembered in ``free_key`` for ``FREE_TTL_MS``.
  ENTER  a gateway queues a request: ZADD, refresh the gateway's liveness, and claim a
         remembered free slot (it freed after the request's last rejection); or report
         that everyone ahead already holds an offer (a newcomer then probes at once).
  LEAVE  ZREM the entry and its offer mark.
  Each step that turns the queue empty or non-empty publishes "0" / "1" on the group's
  queue-state channel, so gateways know an empty queue without asking on every request.
  RESYNC after a Redis outage: the gateway's entries become exactly its live waiters.

Offers are conservative hints: the waiter still asks the prefill, which accepts or
rejects (P/D-Serve). A stolen slot costs one rejection and the waiter keeps its place.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

from services.cluster.keys import (
    free_key,
    gateways_key,
    offered_key,
    queue_key,
    queue_state_channel,
    wake_channel_prefix,
)

OFFER_TTL_MS = 2000  # an offered entry is skipped by other offers this long (its try)
FREE_TTL_MS = 250  # an untaken free slot is remembered this long (covers enter races)
SEP = "|"  # member = "<request>|<gateway>"; gateway ids never contain it

_OFFER = """
local q, offered, free, gws = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now = tonumber(ARGV[1])
local pruned = redis.call('ZREMRANGEBYSCORE', q, '-inf', now)
local start = 0
while true do
  local batch = redis.call('ZRANGE', q, start, start + 31)
  if #batch == 0 then break end
  local removed = 0
  for _, m in ipairs(batch) do
    local gw = string.match(m, '|([^|]*)$') or ''
    local alive = tonumber(redis.call('HGET', gws, gw) or '0')
    if alive <= now then
      redis.call('ZREM', q, m)
      redis.call('HDEL', offered, m)
      removed = removed + 1
      pruned = pruned + 1
    elseif tonumber(redis.call('HGET', offered, m) or '0') <= now then
      redis.call('HSET', offered, m, now + tonumber(ARGV[3]))
      redis.call('PUBLISH', ARGV[5] .. gw, m .. '\\n' .. ARGV[2] .. '\\n' .. ARGV[1])
      return m
    end
  end
  start = start + #batch - removed
end
if pruned > 0 and redis.call('ZCARD', q) == 0 then redis.call('PUBLISH', ARGV[6], '0') end
redis.call('ZADD', free, now, ARGV[2])
redis.call('PEXPIRE', free, tonumber(ARGV[4]))
return false
"""

_ENTER = """
local q, offered, free, gws = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now = tonumber(ARGV[4])
redis.call('ZADD', q, ARGV[2], ARGV[1])
if redis.call('ZCARD', q) == 1 then redis.call('PUBLISH', ARGV[8], '1') end
redis.call('HSET', gws, ARGV[3], ARGV[5])
redis.call('ZREMRANGEBYSCORE', free, '-inf', now - tonumber(ARGV[6]))
local got = redis.call('ZPOPMIN', free)
if #got > 0 then
  redis.call('HSET', offered, ARGV[1], now + tonumber(ARGV[7]))
  return got[1]
end
-- Does anyone wait ahead of it without an offer? If every entry ahead holds one (they
-- are being admitted and about to leave), it is the real head: '' = probe the prefills.
redis.call('ZREMRANGEBYSCORE', q, '-inf', now)
for _, m in ipairs(redis.call('ZRANGE', q, 0, -1)) do
  if m == ARGV[1] then return '' end
  if tonumber(redis.call('HGET', offered, m) or '0') <= now then return false end
end
return false
"""

_LEAVE = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 and redis.call('ZCARD', KEYS[1]) == 0 then
  redis.call('PUBLISH', ARGV[2], '0')
end
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""

_RESYNC = """
local q, offered, gws = KEYS[1], KEYS[2], KEYS[3]
local suffix = '|' .. ARGV[1]
for _, m in ipairs(redis.call('ZRANGE', q, 0, -1)) do
  if string.sub(m, -#suffix) == suffix then
    redis.call('ZREM', q, m)
    redis.call('HDEL', offered, m)
  end
end
redis.call('HSET', gws, ARGV[1], ARGV[2])
for i = 4, #ARGV, 2 do
  redis.call('ZADD', q, ARGV[i + 1], ARGV[i])
end
redis.call('PUBLISH', ARGV[3], redis.call('ZCARD', q) > 0 and '1' or '0')
return 1
"""

_cache: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def _script(client: Any, name: str, src: str) -> Any:
    scripts = _cache.setdefault(client, {})
    if name not in scripts:
        # EVALSHA; redis-py loads the script again after NOSCRIPT (a restarted Redis).
        scripts[name] = client.register_script(src)
    return scripts[name]


def member(request_id: str, gateway_id: str) -> str:
    return f"{request_id}{SEP}{gateway_id}"


def split_member(m: str) -> tuple[str, str]:
    rid, _, gw = m.rpartition(SEP)
    return rid, gw


def now_ms() -> float:
    return round(time.time() * 1000, 3)


async def offer_slot(client: Any, group: str, prefill_id: str) -> str | None:
    """A prefill freed a slot: offer it to the group's earliest-deadline waiter. Returns
    the member it went to, or None (remembered as free for ``FREE_TTL_MS``)."""
    got = await _script(client, "offer", _OFFER)(
        keys=[queue_key(group), offered_key(group), free_key(group), gateways_key(group)],
        args=[now_ms(), prefill_id, OFFER_TTL_MS, FREE_TTL_MS, wake_channel_prefix(group),
              queue_state_channel(group)])
    return got.decode() if isinstance(got, bytes) else got or None


async def enter(client: Any, group: str, m: str, deadline_ms: float, gateway_id: str,
                alive_until_ms: int) -> str | None:
    """Queue ``m``. Returns a prefill whose slot freed unclaimed just before (ask it);
    "" when every entry ahead already holds an offer (no one really waits ahead: probe
    the prefills now); None to wait for an offer."""
    now = now_ms()
    got = await _script(client, "enter", _ENTER)(
        keys=[queue_key(group), offered_key(group), free_key(group), gateways_key(group)],
        args=[m, deadline_ms, gateway_id, now, alive_until_ms, FREE_TTL_MS, OFFER_TTL_MS,
              queue_state_channel(group)])
    if isinstance(got, bytes):
        return got.decode()
    return None


async def leave(client: Any, group: str, m: str) -> None:
    await _script(client, "leave", _LEAVE)(keys=[queue_key(group), offered_key(group)],
                                           args=[m, queue_state_channel(group)])


async def resync(client: Any, group: str, gateway_id: str, alive_until_ms: int,
                 entries: dict[str, float]) -> None:
    """Make the gateway's entries in ``group`` exactly ``entries`` (member -> deadline)."""
    args: list[Any] = [gateway_id, alive_until_ms, queue_state_channel(group)]
    for m, deadline in entries.items():
        args += [m, deadline]
    await _script(client, "resync", _RESYNC)(
        keys=[queue_key(group), offered_key(group), gateways_key(group)], args=args)
