"""The simulator's inputs and outputs: configuration, requests, per-request results and
mergeable fleet statistics. Every knob of the modelled cluster is a ``SimConfig`` field
(and a flag of ``bench/sim_fleet.py``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

LOP_QUEUE = "lop-queue"  # least open *prefill-phase* streams, local FIFO (simulator only)

# Request end states.
OK = "ok"
DEADLINE = "deadline"  # TTFT deadline passed (queue, before or after compute, unreachable)
CANCELLED = "cancelled"  # the client went away
REFUSED = "refused"  # no routable prefill (e.g. a controller drained them all, queueing)


@dataclass(frozen=True)
class SimConfig:
    policy: str = "forward"
    groups: int = 2
    prefills_per_group: int = 4
    decodes_per_group: int = 2
    slots: int = 1  # b_p
    decode_slots: int = 64  # b_d
    # The decode's paged KV pool: a request needs prompt + output + 1 tokens of it, in
    # blocks (the live decode's admission rule); 0 = no pool limit, slots only.
    decode_pool_tokens: int = 0
    decode_block_tokens: int = 16
    gateways: int = 2
    rtt_ms: float = 1.0  # one round trip gateway <-> worker (a TRY, a first token back)
    kv_bytes_per_token: int = 12 * 1024
    kv_gbps: float = 10.0  # link speed of the KV hops (prefill -> kvstore -> decode)
    kv_fixed_ms: float = 0.0  # per-hop fixed cost of a KV transfer (RPC, allocation)
    fetch: bool = True  # the decode fetches the KV (a second hop) before it joins its batch
    offer_ms: float = 0.7  # a freed slot's offer, prefill -> Redis -> waiting gateway
    queue_poll_ms: float = 1000.0  # the gateways' safety-net poll of a non-empty queue
    gateway_ms: float = 0.0  # per-request gateway cost before the first TRY (tokenize etc.)
    report_ms: float = 100.0  # reported-queue's load reports
    slo_factor: float = 4.0
    slo_floor_ms: float = 300.0
    time_scale: float = 1.0  # multiplies every modelled compute time (the live bench's 3)
    # Early intervention also ends a request whose prefill cannot finish by its deadline
    # (the live PrefillEstimator's lower bound), instead of spending the slot on it.
    predictive: bool = True
    prefix_cache: bool = True  # per-prefill LRU of the requests' 512-token hash blocks
    prefix_cache_blocks: int = 8192  # in 64-token blocks, as the mock engine counts them
    cancel_frac: float = 0.0  # share of requests the client cancels at a random time
    seed: int = 0
    control_period_ms: float = 0.0  # 0: no controller
    switch_ms: float = 0.0  # a drained instance's reload time before it serves its new role

    def slo_ms(self, prefill_ms: float) -> float:
        return self.slo_factor * prefill_ms + self.slo_floor_ms


@dataclass(frozen=True, slots=True)  # slots: built once per simulated request, 2x faster
class SimRequest:
    arrival_ms: float
    prompt_len: int
    output_len: int
    group: int
    hash_ids: tuple[int, ...] = ()


@dataclass
class Result:
    ok: bool  # got a first token (possibly late) and all its tokens
    ttft_ms: float
    slo_ms: float
    end_ms: float
    waited_in_queue: bool = False
    status: str = OK
    arrival_ms: float = 0.0
    e2e_ms: float = float("nan")
    prefill: str = ""
    decode: str = ""
    prefill_start_ms: float = float("nan")
    first_token_ms: float = float("nan")  # absolute virtual time
    decode_start_ms: float = float("nan")
    cached_tokens: int = 0

    @property
    def slo_met(self) -> bool:
        return self.ok and self.ttft_ms <= self.slo_ms


# Log-spaced histogram bins for fleet-scale percentiles (no per-request storage):
# 1.02x per bin from 0.1 ms, so a percentile is within 1% of the exact value.
_BIN_BASE = 0.1
_BIN_LOG = math.log(1.02)
_BINS = 1200


def _bin(ms: float) -> int:
    if ms <= _BIN_BASE:
        return 0
    return min(_BINS - 1, int(math.log(ms / _BIN_BASE) / _BIN_LOG) + 1)


@dataclass
class Stats:
    """What a fleet run keeps: counts, sums and histograms; ``merge`` adds shards."""

    requests: int = 0
    ok: int = 0
    deadline: int = 0
    cancelled: int = 0
    refused: int = 0
    slo_met: int = 0
    queued: int = 0
    events: int = 0
    moves: int = 0  # reassignments applied (role or group switches started)
    sim_ms: float = 0.0
    prefill_busy_ms: float = 0.0  # slot-ms busy (compute + KV push), all prefills
    prefill_slot_ms: float = 0.0  # slot-ms available
    ttft_sum: float = 0.0
    e2e_sum: float = 0.0
    ttft_hist: list[int] = field(default_factory=lambda: [0] * _BINS)
    e2e_hist: list[int] = field(default_factory=lambda: [0] * _BINS)

    def add(self, r: Result) -> None:
        self.requests += 1
        if r.status == OK:
            self.ok += 1
            self.slo_met += r.ttft_ms <= r.slo_ms
            self.ttft_sum += r.ttft_ms
            self.e2e_sum += r.e2e_ms
            self.ttft_hist[_bin(r.ttft_ms)] += 1
            self.e2e_hist[_bin(r.e2e_ms)] += 1
        elif r.status == DEADLINE:
            self.deadline += 1
        elif r.status == CANCELLED:
            self.cancelled += 1
        else:
            self.refused += 1
        self.queued += r.waited_in_queue

    def merge(self, o: Stats) -> None:
        for name in ("requests", "ok", "deadline", "cancelled", "refused", "slo_met", "queued",
                     "events", "moves", "prefill_busy_ms", "prefill_slot_ms", "ttft_sum",
                     "e2e_sum"):
            setattr(self, name, getattr(self, name) + getattr(o, name))
        self.sim_ms = max(self.sim_ms, o.sim_ms)
        self.ttft_hist = [a + b for a, b in zip(self.ttft_hist, o.ttft_hist, strict=True)]
        self.e2e_hist = [a + b for a, b in zip(self.e2e_hist, o.e2e_hist, strict=True)]

    @staticmethod
    def percentile(hist: list[int], q: float) -> float:
        total = sum(hist)
        if not total:
            return float("nan")
        want = q * total
        run = 0
        for i, n in enumerate(hist):
            run += n
            if run >= want:
                return _BIN_BASE * math.exp(_BIN_LOG * (i - 0.5)) if i else _BIN_BASE
        return float("nan")

    @property
    def prefill_utilisation(self) -> float:
        return self.prefill_busy_ms / self.prefill_slot_ms if self.prefill_slot_ms else 0.0

    def summary(self) -> dict[str, float]:
        ok = max(self.ok, 1)
        return {"requests": self.requests, "ok": self.ok, "deadline": self.deadline,
                "cancelled": self.cancelled, "refused": self.refused,
                "slo_success": self.slo_met / max(self.requests, 1),
                "ttft_mean_ms": self.ttft_sum / ok, "e2e_mean_ms": self.e2e_sum / ok,
                "ttft_p50_ms": self.percentile(self.ttft_hist, 0.5),
                "ttft_p99_ms": self.percentile(self.ttft_hist, 0.99),
                "e2e_p50_ms": self.percentile(self.e2e_hist, 0.5),
                "e2e_p99_ms": self.percentile(self.e2e_hist, 0.99),
                "events": self.events, "moves": self.moves, "sim_s": self.sim_ms / 1e3,
                "prefill_utilisation": self.prefill_utilisation}


def dump_results(results: list[Result]) -> bytes:
    """The run's per-request output as bytes (one JSON object a line, NaN as null): two
    runs with the same inputs and seed must give byte-identical output."""
    import json
    from dataclasses import asdict

    lines = []
    for r in results:
        d = {k: (None if isinstance(v, float) and math.isnan(v) else v)
             for k, v in asdict(r).items()}
        lines.append(json.dumps(d, sort_keys=True))
    return ("\n".join(lines) + "\n").encode()
