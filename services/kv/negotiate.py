"""Choosing a path, moving the KV on it, and falling back to tcp visibly.

The kvstore advertises its endpoints (``KvEndpoint``: tcp always, shm when it can make
memfds, rdma when its Mooncake engine started) in every ``ReserveKvResponse`` and, through
the prefill, in every ``KvRef``. A client (prefill pushing, decode fetching) takes the first
transport in its own ``kv_transports`` order that both ends can use:

  shm   the endpoint's host_id is this host's and its Unix socket exists here;
  rdma  Mooncake loads here and runs the same wire protocol as the kvstore's engine
        (Mooncake cannot pair an RDMA engine with a TCP one), and either an RDMA device
        exists or ``kv_rdma_tcp_mode`` allows Mooncake's TCP transport;
  tcp   always.

If the transfer fails to connect or breaks mid-way on shm or rdma, it is retried once on
tcp within the same time budget (the first attempt gets half of it), unless ``kv_fallback``
is off. Every fallback is counted (``TransferStats``: the instance's load in Redis, which the
scheduler reads as ``kv_fallback_rate``), set on the current span (``pdserve.kv.fallback``)
and returned, so the request's final timings carry it. Failures end as PdserveErrors with a
clear status: UNAVAILABLE (reason ``KV_TRANSFER_FAILED`` / ``KV_FETCH_FAILED``) or
DEADLINE_EXCEEDED (``KV_TRANSFER_TIMEOUT``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from opentelemetry import trace

from pdserve.v1 import common_pb2
from services.common.errors import DeadlineExceeded, Unavailable
from services.kv.base import KvLease, KvTransport, Reservation, TransferError
from services.kv.config import KvTransferConfig
from services.kv.layout import HEADER_BYTES, KvFormatError, byte_view, decode_header
from services.kv.rdma import (
    RdmaTransport,
    mooncake_importable,
    rdma_devices,
    wire_protocol,
)
from services.kv.shm import ShmTransport
from services.kv.tcp import TcpTransport
from services.kv.wire import FLAG_FALLBACK, FLAG_RETRYABLE
from services.observe.telemetry import ATTR_KV_FALLBACK, ATTR_KV_TRANSPORT

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)
ATTR_KV_FALLBACK_FROM = "pdserve.kv.fallback_from"
ATTR_KV_FALLBACK_ERROR = "pdserve.kv.fallback_error"


@dataclass
class TransferResult:
    transport: str  # what carried the bytes: "shm", "tcp", "rdma/tcp", "rdma/rdma"
    fallback: bool = False  # True: the negotiated path failed and tcp carried them
    planned: str = ""  # the negotiated transport
    error: str = ""  # why the negotiated path failed (when fallback)
    ms: float = 0.0


@dataclass
class TransferStats:
    """Per-process counters: the metric behind the scheduler-visible fallback rate."""

    transfers: int = 0
    fallbacks: int = 0
    failures: int = 0
    by_transport: dict[str, int] = field(default_factory=dict)

    def record(self, result: TransferResult | None) -> None:
        self.transfers += 1
        if result is None:
            self.failures += 1
            return
        self.fallbacks += int(result.fallback)
        self.by_transport[result.transport] = self.by_transport.get(result.transport, 0) + 1

    def load(self) -> dict[str, float]:
        return {"kv_transfers": float(self.transfers), "kv_fallbacks": float(self.fallbacks),
                "kv_transfer_failures": float(self.failures),
                "kv_fallback_rate": self.fallbacks / self.transfers if self.transfers else 0.0}


STATS = TransferStats()


def transfer_load() -> dict[str, float]:
    """This process's data-plane counters, for its registry load (read by the scheduler)."""
    return STATS.load()


def shm_client_supported() -> bool:
    return hasattr(socket, "send_fds") and hasattr(os, "memfd_create")


def rdma_usable(cfg: KvTransferConfig) -> bool:
    return (bool(rdma_devices()) or cfg.kv_rdma_tcp_mode) and mooncake_importable()


def client_transports(cfg: KvTransferConfig) -> tuple[str, ...]:
    """What this process can use as a client, in its order (advertised in the registry)."""
    ok = {"tcp": True, "shm": shm_client_supported(), "rdma": rdma_usable(cfg)}
    return tuple(t for t in cfg.transports if ok[t])


def client_for(transport: str, cfg: KvTransferConfig | None = None) -> KvTransport:
    if transport == "shm":
        return ShmTransport(cfg.kv_client_cache_mb << 20 if cfg is not None else None)
    if transport == "rdma":
        return RdmaTransport()
    if transport == "tcp":
        return TcpTransport(cfg.kv_client_cache_mb << 20 if cfg is not None else None)
    raise TransferError(f"unknown KV transport {transport!r}")


def endpoints_of(endpoints: list[common_pb2.KvEndpoint] | None,
                 data_address: str) -> list[common_pb2.KvEndpoint]:
    eps = list(endpoints or [])
    if not any(e.transport == "tcp" for e in eps) and data_address:
        eps.append(common_pb2.KvEndpoint(transport="tcp", address=data_address, protocol="tcp"))
    return eps


def plan(cfg: KvTransferConfig, endpoints: list[common_pb2.KvEndpoint],
         this_host: str) -> tuple[common_pb2.KvEndpoint, common_pb2.KvEndpoint | None]:
    """The best usable endpoint, and the tcp endpoint to fall back to (None: no fallback)."""
    tcp = next((e for e in endpoints if e.transport == "tcp"), None)
    best: common_pb2.KvEndpoint | None = None
    for name in cfg.transports:
        for ep in endpoints:
            if ep.transport != name:
                continue
            if name == "shm" and not (shm_client_supported() and ep.host_id == this_host
                                      and os.path.exists(ep.address)):
                continue
            if name == "rdma" and not (rdma_usable(cfg) and ep.protocol == wire_protocol()):
                continue
            best = ep
            break
        if best is not None:
            break
    if best is None:
        if tcp is None:
            raise Unavailable("the kvstore offers no KV transport this process can use "
                              f"(allowed here: {cfg.kv_transports})", reason="KV_NO_TRANSPORT")
        best = tcp
    fallback = tcp if (cfg.kv_fallback and best is not tcp and "tcp" in cfg.transports) else None
    return best, fallback


def block_bytes(cfg: KvTransferConfig, data: memoryview, num_tokens: int) -> int:
    """Bytes of one block in block mode (0: contiguous): ``kv_block_tokens`` tokens of ONE
    layer (K and V), the page a paged KV cache holds and transfers with one confirmation
    each. Only tcp implements block-fixed transfer; shm and rdma move one buffer."""
    if cfg.kv_transfer_mode != "block" or num_tokens <= 0 or len(data) <= HEADER_BYTES:
        return 0
    try:
        meta = decode_header(data)
        per_token = meta.layer_nbytes // meta.num_tokens
    except KvFormatError:  # not a KV buffer (tests): blocks of whole tokens
        per_token = (len(data) - HEADER_BYTES) // num_tokens
    return max(1, per_token * cfg.kv_block_tokens)


async def _move(cfg: KvTransferConfig, endpoints: list[common_pb2.KvEndpoint], handle: str,
                request_id: str, data: memoryview | None, block: int,
                timeout_s: float | None, push: bool,
                hold: bool = False) -> tuple[KvLease | None, TransferResult]:
    from services.common.runtime import host_id

    budget = min(cfg.kv_transfer_timeout_s, timeout_s) if timeout_s else cfg.kv_transfer_timeout_s
    t0 = time.monotonic()
    best, fallback = plan(cfg, endpoints, host_id())
    span = trace.get_current_span()
    what = "push" if push else "fetch"
    reason = "KV_TRANSFER_FAILED" if push else "KV_FETCH_FAILED"
    meta = {"request_id": request_id}
    attempts = [(best, 0)] + ([(fallback, FLAG_FALLBACK)] if fallback is not None else [])
    first_error = ""
    for i, (ep, flags) in enumerate(attempts):
        client = client_for(ep.transport, cfg)
        left = budget - (time.monotonic() - t0)
        # The first attempt keeps half the budget back for the fallback.
        limit = left / 2 if (i == 0 and len(attempts) > 1) else left
        if i == 0 and len(attempts) > 1:
            flags |= FLAG_RETRYABLE
        blk = block if ep.transport == "tcp" else 0
        try:
            async with asyncio.timeout(max(limit, 0.001)):
                if push:
                    assert data is not None
                    await client.put(ep.address, handle, request_id, data, flags, blk)
                    out = None
                elif hold:
                    out = await client.open_get(ep.address, handle, request_id, flags, blk)
                else:
                    out = KvLease(await client.get(ep.address, handle, request_id, flags, blk))
        except (TransferError, TimeoutError) as e:
            timed_out = isinstance(e, TimeoutError)
            msg = (f"{ep.transport} {what} timed out after {limit:.2f} s" if timed_out
                   else f"{ep.transport} {what} failed: {e}")
            last = i == len(attempts) - 1
            if last or not (timed_out or e.retryable):  # type: ignore[union-attr]
                STATS.record(None)
                span.set_attribute(ATTR_KV_FALLBACK, i > 0)
                full = f"KV {what} failed: {first_error + '; then ' if first_error else ''}{msg}"
                if timed_out:
                    raise DeadlineExceeded(full, reason="KV_TRANSFER_TIMEOUT",
                                           metadata=meta) from e
                raise Unavailable(full, reason=reason, metadata=meta) from e
            first_error = msg
            log.warning("KV %s of %s: %s; retrying once on tcp (fallback)", what,
                        request_id, msg)
            continue
        result = TransferResult(client.label, fallback=i > 0, planned=best.transport,
                                error=first_error, ms=(time.monotonic() - t0) * 1e3)
        STATS.record(result)
        span.set_attribute(ATTR_KV_TRANSPORT, result.transport)
        span.set_attribute(ATTR_KV_FALLBACK, result.fallback)
        if result.fallback:
            span.set_attribute(ATTR_KV_FALLBACK_FROM, best.transport)
            span.set_attribute(ATTR_KV_FALLBACK_ERROR, first_error[:300])
        return out, result
    raise AssertionError("unreachable")


async def push_kv(cfg: KvTransferConfig, reservation: Reservation, request_id: str,
                  data: memoryview | np.ndarray, num_tokens: int,
                  timeout_s: float | None = None) -> TransferResult:
    """Push a packed KV buffer into its reservation (a ``ReserveKvResponse``)."""
    eps = endpoints_of(list(reservation.endpoints),
                       reservation.data_address)
    _, result = await _move(cfg, eps, reservation.handle,
                            request_id, byte_view(data),
                            block_bytes(cfg, byte_view(data), num_tokens), timeout_s,
                            push=True)
    return result


async def _pull(cfg: KvTransferConfig, kv: common_pb2.KvRef, request_id: str,
                timeout_s: float | None, hold: bool) -> tuple[KvLease, TransferResult]:
    """Fetch a staged KV buffer (single consumer) on the best path, with fallback."""
    eps = endpoints_of(list(kv.endpoints), kv.data_address)
    if not eps:
        raise Unavailable("KvRef names no data endpoint", reason="KV_FETCH_FAILED",
                          metadata={"request_id": request_id})
    # A fetch asks for blocks of this many tokens; the kvstore sizes the pages from the
    # staged header (it knows the layer count) and says so in its answer.
    block = cfg.kv_block_tokens if cfg.kv_transfer_mode == "block" else 0
    lease, result = await _move(cfg, eps, kv.handle, request_id, None, block, timeout_s,
                                push=False, hold=hold)
    assert lease is not None
    return lease, result


async def pull_kv(cfg: KvTransferConfig, kv: common_pb2.KvRef, request_id: str,
                  timeout_s: float | None = None) -> tuple[memoryview, TransferResult]:
    """Fetch a staged KV buffer (single consumer) on the best path, with fallback. The
    caller keeps the view; over shm it is a mapping the kvstore then never reuses (see
    ``fetch_kv`` for the pooled variant)."""
    lease, result = await _pull(cfg, kv, request_id, timeout_s, hold=False)
    return lease.view, result


@dataclass
class KvFetch:
    """A fetched KV held until its reader has copied it out (``fetch_kv``).

    ``async with`` it around the copy (decode's RecvScatter): a normal exit, or an
    ordinary exception (the copy finished or never started), releases it, so the
    kvstore may reuse the memory. Cancellation aborts instead: the copy may still run
    on a thread, so the kvstore closes that memory rather than reuse it."""

    view: memoryview
    result: TransferResult
    lease: KvLease

    async def __aenter__(self) -> KvFetch:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: object,
                        tb: object) -> None:
        if exc_type is None or issubclass(exc_type, Exception):
            await self.release()
        else:
            self.lease.abort()

    async def release(self) -> None:
        self.view = memoryview(b"")  # drop our reference before the lease unmaps
        await asyncio.shield(self.lease.release())


async def fetch_kv(cfg: KvTransferConfig, kv: common_pb2.KvRef, request_id: str,
                   timeout_s: float | None = None) -> KvFetch:
    """Fetch a staged KV buffer and hold it until ``KvFetch`` is released: over shm the
    decode reads the kvstore's pages in place, and they go back to the kvstore's pool
    once it has copied them out. Use ``async with (await fetch_kv(...)) as f:``."""
    lease, result = await _pull(cfg, kv, request_id, timeout_s, hold=True)
    return KvFetch(lease.view, result, lease)


__all__ = ["STATS", "KvFetch", "TransferResult", "TransferStats", "block_bytes",
           "client_transports", "fetch_kv", "plan", "pull_kv", "push_kv", "transfer_load"]
