"""What the device's optimiser knows, and per-request settings (docs/pd-device.md).

The optimiser profile (JSON, written by ``pdserve device profile``):
  {"device": {"prefill": [[n, ms], ...], "tpot_ms": t, "chunk_overhead_ms": o},
   "cloud": {"ttft": [[n, ms], ...], "tpot_ms": t, "t2_gap": [[n, ms], ...]},
   "rtt_ms": r, "bandwidth_mbps": b, "quality": {"1.0": 1.0, "0.5": 0.8, ...}}
Without one the device measures its own curve at start-up (``measure_device``) and
assumes ``DEFAULT_CLOUD`` until it has seen the cloud; then ``observe`` moves the
cloud's figures toward what requests really saw (an EWMA), the "trajectory-driven"
part of the settings decision. ``t2_gap`` (optional) is the cloud's gap between its
first and second token (the prefill -> decode KV handoff), which sizes the first-token
hold; without it the planner starts from the first gap it observes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from services.device.optimizer import Constraints, Curve, Plan, Profiles

DEFAULT_CLOUD: dict[str, Any] = {"ttft": [[0, 60.0], [4096, 600.0]], "tpot_ms": 20.0}
EWMA = 0.3


def _curve(points: list[list[float]]) -> Curve:
    return Curve(tuple((float(n), float(ms)) for n, ms in points))


def load_plan_profile(path: str) -> dict[str, Any]:
    return dict(json.loads(Path(path).read_text()))


def measure_device(engine: Any, sizes: tuple[int, ...] = (16, 128, 512)) -> dict[str, Any]:
    """T_pf(n) and t_dev of this device engine, as it really runs (stretch included)."""
    points = []
    for n in sizes:
        s = engine.new_session()
        t0 = time.monotonic()
        tok = engine.prefill_chunk(s, [3 + i % 200 for i in range(n)])
        points.append([n, (time.monotonic() - t0) * 1e3])
    t0 = time.monotonic()
    for _ in range(4):
        tok = engine.decode(s, tok)
    return {"prefill": points, "tpot_ms": (time.monotonic() - t0) * 1e3 / 4}


class Planner:
    def __init__(self, profile: dict[str, Any], rtt_ms: float, bandwidth_mbps: float,
                 chunk_tokens: int, constraints: Constraints) -> None:
        dev = profile["device"]
        cloud = profile.get("cloud", DEFAULT_CLOUD)
        quality = {float(k): float(v) for k, v in profile.get("quality", {"1.0": 1.0}).items()}
        self.constraints = dataclasses.replace(constraints, quality=quality)
        self.profiles = Profiles(
            device_prefill=_curve(dev["prefill"]), device_tpot_ms=float(dev["tpot_ms"]),
            cloud_ttft=_curve(cloud["ttft"]), cloud_tpot_ms=float(cloud["tpot_ms"]),
            rtt_ms=float(profile.get("rtt_ms", rtt_ms)),
            bandwidth_mbps=float(profile.get("bandwidth_mbps", bandwidth_mbps or 1e4)),
            chunk_tokens=chunk_tokens,
            chunk_overhead_ms=float(dev.get("chunk_overhead_ms", 5.0)),
            cloud_t2_gap=_curve(cloud["t2_gap"]) if cloud.get("t2_gap") else None)
        self._ttft_scale = 1.0
        self._t2_scale = 1.0  # observed / profiled t1 -> t2 gap
        self._device_scale = 1.0  # observed / profiled catch-up prefill time

    def plan(self, n: int, out_len: int, constraints: Constraints | None = None) -> Plan:
        from services.device.optimizer import choose

        c = constraints or self.constraints
        p = self.profiles
        if self._ttft_scale != 1.0:
            p = dataclasses.replace(p, cloud_ttft=Curve(tuple(
                (x, y * self._ttft_scale) for x, y in p.cloud_ttft.points)))
        if self._device_scale != 1.0:
            p = dataclasses.replace(
                p, device_prefill=Curve(tuple(
                    (x, y * self._device_scale) for x, y in p.device_prefill.points)),
                chunk_overhead_ms=p.chunk_overhead_ms * self._device_scale)
        if self._t2_scale != 1.0 and p.cloud_t2_gap is not None:
            p = dataclasses.replace(p, cloud_t2_gap=Curve(tuple(
                (x, y * self._t2_scale) for x, y in p.cloud_t2_gap.points)))
        return choose(p, c, n, out_len)

    def observe_device(self, tokens: int, chunks: int, wall_ms: float) -> None:
        """Fold one catch-up in: ``tokens`` prefilled in ``chunks`` took ``wall_ms``.
        A device slower than its profile (thermal limits, other apps; here, the cloud's
        processes on the same cores) would otherwise get plans whose budget N runs out
        before it is ready, and the display stalls."""
        p = self.profiles
        planned = p.device_prefill(tokens) + chunks * p.chunk_overhead_ms
        if tokens <= 0 or wall_ms <= 0 or planned <= 0:
            return
        seen = min(10.0, max(0.1, wall_ms / planned))
        self._device_scale += EWMA * (seen - self._device_scale)

    def observe(self, n: int, first_arrival_ms: float, cloud_tpot_ms: float,
                t2_gap_ms: float = 0.0) -> None:
        """Fold one request's cloud figures in (first token arrival, mean gap, and the
        gap between the first two tokens as they arrived; 0: not seen)."""
        p = self.profiles
        if t2_gap_ms > 0:
            if p.cloud_t2_gap is None:  # no profiled curve: start flat at what was seen
                self.profiles = p = dataclasses.replace(
                    p, cloud_t2_gap=Curve(((0.0, t2_gap_ms),)))
            else:
                seen = min(10.0, max(0.1, t2_gap_ms / max(1e-3, p.cloud_t2_gap(n))))
                self._t2_scale += EWMA * (seen - self._t2_scale)
        base = p.rtt_ms + p.upload_ms(n) + p.cloud_ttft(n)
        if first_arrival_ms > 0 and base > 0:
            seen = max(0.1, (first_arrival_ms - p.rtt_ms - p.upload_ms(n)) / p.cloud_ttft(n))
            self._ttft_scale += EWMA * (seen - self._ttft_scale)
        if cloud_tpot_ms > 0:
            self.profiles = dataclasses.replace(
                p, cloud_tpot_ms=p.cloud_tpot_ms + EWMA * (cloud_tpot_ms - p.cloud_tpot_ms))
