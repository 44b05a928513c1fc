"""Test-only fault points: named pauses in a request's path, set through settings.

``PDSERVE_FAULT_DELAYS`` (``ServiceConfig.fault_delays``) is a comma-separated list of
``point=seconds``; the runtime installs it for its process. Code on a request's path calls
``await pause("kvstore.reserve")`` at the windows that matter (between reserve, push,
``kv_ready`` and fetch), so a test can hold a request exactly there and cancel or kill
something in that window on purpose, not by chance. With no spec (production) ``pause``
returns at once without awaiting anything.

Points (the process that owns them in brackets):
  kvstore.reserve           [kvstore] after the reservation is made, before the answer
  prefill.before_reserve    [prefill] admitted, before ReserveKv is sent
  prefill.after_reserve     [prefill] reserved, before ``accepted``
  prefill.after_push        [prefill] the KV is READY at the kvstore, before ``kv_ready``
  prefill.after_kv_ready    [prefill] ``kv_ready`` sent, before the stream ends
  gateway.before_kv_read    [gateway] first token relayed, before reading ``kv_ready``
  gateway.before_decode     [gateway] KvRef in hand, before asking a decode
  decode.before_fetch       [decode] blocks reserved, before the fetch starts
"""

from __future__ import annotations

import asyncio
import math

POINTS = ("kvstore.reserve", "prefill.before_reserve", "prefill.after_reserve",
          "prefill.after_push", "prefill.after_kv_ready", "gateway.before_kv_read",
          "gateway.before_decode", "decode.before_fetch")

_delays: dict[str, float] = {}
hits: dict[str, int] = {}  # how often each configured point paused (tests read it)


def parse(spec: str) -> dict[str, float]:
    """``"a=0.5,b=1"`` -> {"a": 0.5, "b": 1.0}; ValueError names what is wrong."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, raw = part.partition("=")
        if name not in POINTS:
            raise ValueError(f"unknown fault point {name!r}; points: {', '.join(POINTS)}")
        try:
            secs = float(raw)
        except ValueError:
            raise ValueError(f"fault point {name}: {raw!r} is not a number of seconds") from None
        if not (0 <= secs < math.inf):
            raise ValueError(f"fault point {name}: need 0 <= seconds < inf, got {raw}")
        out[name] = secs
    return out


def install(spec: str) -> None:
    """Set this process's fault points (replaces any earlier ones)."""
    _delays.clear()
    _delays.update(parse(spec))
    hits.clear()


async def pause(point: str) -> None:
    """Sleep for the configured delay of ``point``; a no-op when none is configured."""
    if not _delays:
        return
    secs = _delays.get(point)
    if secs is None:
        return
    hits[point] = hits.get(point, 0) + 1
    await asyncio.sleep(secs)
