"""The fault matrix, one function per fault. Each takes a running ``ProcCluster`` and a
scale (requests per case), sends load through the public API, injects the fault while the
load is in flight, and returns a ``Row``: how the requests ended, the KV held right after
(``KV_SETTLE_S``), and the recovery time (fault repaired -> a fresh request served).

Every case leaves the cluster whole for the next one (the victim is restarted), so the
matrix shares one cluster: ``prefill-1``, ``decode-1`` and ``gateway-1`` are the victims;
``prefill-0``, ``decode-0`` and ``gateway-0`` stay up throughout.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

from tests.faults.harness import (
    NS_PEER,
    Outcome,
    ProcCluster,
    Row,
    prompts,
    run_load,
)

DEADLINE_S = 20.0  # the requests' own gRPC deadline
ORPHAN_BOUND_S = 12.0  # a dead gateway's staged KV is freed within this of the kill


def _reqs(n: int, max_tokens: int = 24, tokens: int = 24, seed: int = 0,
          **extra: object) -> list[dict[str, object]]:
    return [{"prompt_token_ids": p, "max_tokens": max_tokens, **extra}
            for p in prompts(n, tokens, seed)]


def _finish(c: ProcCluster, row: Row, outcomes: list[Outcome]) -> Row:
    """Count the outcomes, read the KV held right after, time until a request is served."""
    row.add(outcomes)
    row.kv_held = c.settled_kv()
    row.recovery_s = round(c.wait_serving(), 2)
    return row


def _gw(c: ProcCluster) -> str:
    return c.procs["gateway-0"].address


# -- cases -------------------------------------------------------------------------------------
def duplicate_request_id(c: ProcCluster, n: int,
                         reference: Callable[[list[int], int], list[int]] | None = None) -> Row:
    """Every request of the load carries the same client request_id."""
    row = Row("duplicate request_id under load")
    reqs = _reqs(n, max_tokens=40, seed=11, request_id="same-id")
    out = run_load(reqs, _gw(c), DEADLINE_S)
    if reference is not None:
        for r, o in zip(reqs, out, strict=True):
            if o.kind == "ok" and o.tokens != reference(r["prompt_token_ids"], 40):  # type: ignore[arg-type]
                o.kind, o.code = "unclear", "DIVERGED_FROM_GREEDY"
    return _finish(c, row, out)


def client_cancel(c: ProcCluster, n: int) -> Row:
    """The client cancels at every stage: before admission, during prefill, at the first
    token, mid-stream."""
    row = Row("client cancel at each stage")
    stages: list[dict[str, object]] = [{"cancel_after": 0.0}, {"cancel_after": 0.02},
                                       {"cancel_after": 0.08}, {"cancel_after": 0.2},
                                       {"cancel_after_tokens": 1}, {"cancel_after_tokens": 6}]
    reqs = [{**r, **stages[i % len(stages)]}
            for i, r in enumerate(_reqs(n, max_tokens=60, seed=12))]
    return _finish(c, row, run_load(reqs, _gw(c), DEADLINE_S))


def decode_sigstop(c: ProcCluster, n: int, stop_s: float = 3.0) -> Row:
    """A slow consumer: decode-1 is SIGSTOPped mid-stream, then SIGCONTed."""
    row = Row(f"SIGSTOP decode {stop_s:.0f} s, SIGCONT")

    def fault() -> None:
        if not c.wait_busy("decode-1"):
            row.notes = "the victim took no request"
        c.kill("decode-1", signal.SIGSTOP)
        time.sleep(stop_s)
        c.kill("decode-1", signal.SIGCONT)

    out = run_load(_reqs(n, max_tokens=120, seed=13), _gw(c), DEADLINE_S, during=fault)
    return _finish(c, row, out)


def decode_sigkill(c: ProcCluster, n: int) -> Row:
    """decode-1 is SIGKILLed mid-stream and restarted."""
    row = Row("SIGKILL decode mid-stream")
    t_fix = [0.0]

    def fault() -> None:
        if not c.wait_busy("decode-1"):
            row.notes = "the victim took no request"
        time.sleep(0.3)
        c.kill("decode-1")
        t_fix[0] = time.monotonic()

    out = run_load(_reqs(n, max_tokens=150, seed=14), _gw(c), DEADLINE_S, during=fault)
    row.add(out)
    row.kv_held = c.settled_kv()
    row.recovery_s = round(c.wait_serving(), 2)
    # Back in its own network namespace when the machine allows one (the partition case).
    c.restart("decode-1", netns=c.partition is not None)
    return row


def partition(c: ProcCluster, n: int, cut_s: float = 3.0) -> Row:
    """decode-1 runs in its own network namespace; the veth link is cut mid-stream (packets
    vanish both ways), then healed."""
    assert c.partition is not None
    row = Row(f"partition decode (netns) {cut_s:.0f} s")
    if not c.procs["decode-1"].netns:
        c.restart("decode-1", netns=True)
    assert c.procs["decode-1"].address.startswith(NS_PEER)

    def fault() -> None:
        if not c.wait_busy("decode-1"):
            row.notes = "the victim took no request"
        c.partition.cut()  # type: ignore[union-attr]
        time.sleep(cut_s)
        c.partition.heal()  # type: ignore[union-attr]

    out = run_load(_reqs(n, max_tokens=120, seed=15), _gw(c), 10.0, during=fault)
    return _finish(c, row, out)


def _prefill_kill(c: ProcCluster, n: int, label: str, env: dict[str, str],
                  wait_s: float) -> Row:
    """prefill-1 restarted with ``env`` (the window), SIGKILLed ``wait_s`` after it took a
    request; it stays dead (the next case restarts it as it needs)."""
    row = Row(f"SIGKILL prefill {label}")
    c.restart("prefill-1", env=env)

    def fault() -> None:
        if not c.wait_busy("prefill-1"):
            row.notes = "the victim took no request"
        time.sleep(wait_s)
        c.kill("prefill-1")

    out = run_load(_reqs(n, max_tokens=16, tokens=32, seed=16), _gw(c), DEADLINE_S,
                   during=fault)
    row.add(out)
    row.kv_held = c.settled_kv()
    row.recovery_s = round(c.wait_serving(), 2)
    return row


def prefill_kill_before_accept(c: ProcCluster, n: int) -> Row:
    # Admitted into a slot, not yet reserved or accepted: the gateway asks another prefill.
    return _prefill_kill(c, n, "before accept",
                         {"PDSERVE_FAULT_DELAYS": "prefill.before_reserve=3"}, 0.3)


def prefill_kill_during_compute(c: ProcCluster, n: int) -> Row:
    # KV reserved, the forward running (slowed to 60 ms a token: about 2 s for 32 tokens).
    return _prefill_kill(c, n, "during compute",
                         {"PDSERVE_EMULATE_PREFILL_MS_PER_TOKEN": "60"}, 0.6)


def prefill_kill_during_push(c: ProcCluster, n: int) -> Row:
    # The KV is pushed and READY at the kvstore; kv_ready never goes out.
    return _prefill_kill(c, n, "during push (KV staged, before kv_ready)",
                         {"PDSERVE_FAULT_DELAYS": "prefill.after_push=3"}, 0.8)


def rdma_unavailable(c: ProcCluster, n: int) -> Row:
    """prefill-1 prefers rdma, which this host cannot serve (no RDMA device, no Mooncake
    TCP mode): it negotiates tcp for its pushes and every request is served."""
    row = Row("rdma unavailable (rdma,tcp prefill)")
    c.restart("prefill-1", env={"PDSERVE_KV_TRANSPORTS": "rdma,tcp"})
    out = run_load(_reqs(n, seed=17), _gw(c), DEADLINE_S)
    row = _finish(c, row, out)
    return row


def clock_skew(c: ProcCluster, n: int, skew: str = "+2s") -> Row:
    """prefill-1's wall clock runs ahead (libfaketime): its heartbeats and the TTFT
    deadlines it reads are skewed. Requests carry a 5 s TTFT deadline."""
    row = Row(f"heartbeat clock skew ({skew} on a prefill)")
    c.restart("prefill-1", faketime=skew)
    out = run_load(_reqs(n, seed=18, ttft_deadline_ms=5000), _gw(c), DEADLINE_S)
    # prefill-1 keeps its skewed clock for the cases after this one (a restart costs more
    # than the matrix's other steps on a busy host).
    return _finish(c, row, out)


def transfer_broken(c: ProcCluster, n: int) -> Row:
    """The kvstore drops shm pushes and fetches half-way (and tcp fetches once): the clients
    fall back to tcp or the request ends with a clear status."""
    row = Row("transfer broken mid-way")
    c.restart("kvstore", env={"PDSERVE_KV_FAULTS": "drop_put@shm#4,drop_get@shm#4,drop_get@tcp#1"})
    c.wait_serving()
    out = run_load(_reqs(n, seed=19), _gw(c), DEADLINE_S)
    return _finish(c, row, out)


def kvstore_sigkill(c: ProcCluster, n: int) -> Row:
    """The kvstore is SIGKILLed mid-load and restarted (new ports, empty)."""
    row = Row("SIGKILL kvstore")
    t_fix = [0.0]

    def fault() -> None:
        time.sleep(0.4)
        c.kill("kvstore")
        c.restart("kvstore", env={})
        t_fix[0] = time.monotonic()

    out = run_load(_reqs(n, max_tokens=60, seed=20), _gw(c), DEADLINE_S, during=fault)
    row.add(out)
    row.kv_held = c.settled_kv()
    row.recovery_s = round(time.monotonic() - t_fix[0] + c.wait_serving(), 2)
    return row


def kv_cap(c: ProcCluster, n: int) -> Row:
    """The kvstore's capacity fits about two requests' KV: the rest are rejected as
    KV_CAPACITY, forwarded and queued, and end served or with a clear status."""
    from services.kv.layout import kv_nbytes
    from services.model.info import ModelInfo

    info = ModelInfo.load(c.model)
    one = kv_nbytes(info.num_layers, info.num_kv_heads, info.head_dim, 24, info.kv_dtype)
    row = Row("KV cap reached")
    c.restart("kvstore", env={"PDSERVE_CAPACITY_BYTES": str(2 * one + one // 2)})
    c.wait_serving()
    out = run_load(_reqs(n, max_tokens=40, seed=21), _gw(c), DEADLINE_S)
    row.add(out)
    row.kv_held = c.settled_kv()
    c.restart("kvstore", env={})
    row.recovery_s = round(c.wait_serving(), 2)
    return row


def redis_restart(c: ProcCluster, n: int, down_s: float = 2.0) -> Row:
    """redis-server is SIGKILLed mid-load and started again (empty) after ``down_s``."""
    row = Row(f"kill Redis, restart after {down_s:.0f} s")
    t_fix = [0.0]

    def fault() -> None:
        time.sleep(0.3)
        c.redis.kill()
        time.sleep(down_s)
        c.redis.start()
        t_fix[0] = time.monotonic()

    out = run_load(_reqs(n, seed=22), _gw(c), DEADLINE_S, concurrency=4, during=fault)
    row.add(out)
    row.kv_held = c.settled_kv()
    row.recovery_s = round(c.wait_serving(), 2)
    return row


def gateway_sigkill(c: ProcCluster, n: int) -> Row:
    """gateway-1 is SIGKILLed mid-load while gateway-0 keeps serving; its clients see
    UNAVAILABLE and can retry on gateway-0. gateway-1 holds its requests' KvRefs a while
    before asking a decode (``gateway.before_decode=5``), so it dies holding staged KV that
    only it could release: the kvstore frees it once gateway-1 has left the registry."""
    row = Row("SIGKILL gateway (second one up)")
    c.restart("gateway-1", env={"PDSERVE_FAULT_DELAYS": "gateway.before_decode=5"})
    addrs = [c.procs["gateway-0"].address, c.procs["gateway-1"].address]
    killed = [0.0]

    def fault() -> None:
        end = time.monotonic() + 10
        while c.kv_held_kvstore() == 0 and time.monotonic() < end:
            time.sleep(0.02)
        if c.kv_held_kvstore() == 0:
            row.notes = "gateway-1 never held staged KV"
        c.kill("gateway-1")
        killed[0] = time.monotonic()

    out = run_load(_reqs(n, max_tokens=60, seed=23), lambda i: addrs[i % 2], DEADLINE_S,
                   during=fault)
    row.add(out)
    # Freed when gateway-1 has been out of the registry for 2 TTLs (2 x 1.5 s here), plus a
    # sweep (0.5 s) and a registry poll (0.5 s).
    row.kv_held = c.settled_kv(ORPHAN_BOUND_S)
    row.notes += f"{'; ' if row.notes else ''}dead gateway's KV freed " \
                 f"{time.monotonic() - killed[0]:.1f} s after the kill"
    row.recovery_s = round(c.wait_serving(), 2)
    c.restart("gateway-1")
    return row


ALL = [duplicate_request_id, client_cancel, decode_sigstop, decode_sigkill, partition,
       prefill_kill_before_accept, prefill_kill_during_compute, prefill_kill_during_push,
       rdma_unavailable, clock_skew, transfer_broken, kvstore_sigkill, kv_cap, redis_restart,
       gateway_sigkill]
