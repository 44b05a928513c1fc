"""Per-layer transfer: prefill sends layer i's KV while it computes layer i+1 (tcp).

``kv_layer_overlap`` turns it on. The KV buffer's layout (``services.kv.layout``:
header, then layer 0 K, layer 0 V, layer 1 K, ...) lets each layer go as soon as the
model thread has packed it; the header goes last, because it carries the payload's
crc32, which is known only once every layer is in. The kvstore receives in that order
(wire op PUT_LAYERS), so the staged buffer is byte for byte the one ``push_kv`` would
have sent, and the decode verifies header and checksum exactly as before.

Lifecycle of one push (``LayerPush``):
  1. ``open`` before the forward: plans the path (overlap runs on tcp only; when the plan
     picks shm or rdma, ``open`` returns None and the caller pushes the whole buffer after
     compute, as without the flag), connects and does the one metadata exchange.
  2. ``layer_done(i)`` from the model thread once layer i is packed: the event loop sends
     it (and folds it into the crc) while the model computes layer i+1.
  3. ``finish(header)`` after the forward: the last layers and the header, then the
     kvstore's confirmation. If the stream broke, the whole (now complete) buffer is
     pushed once more on tcp: a fallback, visible as any other (unless ``kv_fallback``
     is off, which fails the push).
  ``abort`` (compute failed or the call was cancelled) closes the connection; the
  kvstore puts the reservation back or aborts it, and prefill releases it as usual.

Waiting for compute is not bounded by the transfer budget (a long prompt computes for
longer than a transfer may take); each layer's send and the finish are. The kvstore
bounds a layered push per layer instead of per transfer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable

import numpy as np

from services.common.errors import DeadlineExceeded, Unavailable
from services.kv.base import Reservation, TransferError
from services.kv.config import KvTransferConfig
from services.kv.layout import HEADER_BYTES, byte_view, payload_crc32
from services.kv.negotiate import (
    STATS,
    TransferResult,
    endpoints_of,
    plan,
)
from services.kv.tcp import TcpTransport
from services.kv.wire import (
    FLAG_FALLBACK,
    FLAG_RETRYABLE,
    Op,
    connect_tcp,
    pack_req,
    read_resp,
)

log = logging.getLogger(__name__)


class LayerPush:
    """One request's KV pushed layer by layer into its reservation (see module doc)."""

    def __init__(self, cfg: KvTransferConfig, reservation: Reservation, request_id: str,
                 buf: np.ndarray, num_layers: int, checksum: bool) -> None:
        self.cfg = cfg
        self.handle: str = reservation.handle
        self.request_id = request_id
        self.buf = buf
        self.num_layers = num_layers
        self.layer_nbytes = (len(buf) - HEADER_BYTES) // num_layers
        self.checksum = checksum
        self.crc = 0
        self.address = ""
        self.layers_sent = 0
        self._loop = asyncio.get_running_loop()
        self._sock: socket.socket | None = None
        self._ready: asyncio.Queue[int] = asyncio.Queue()
        self._sender: asyncio.Task[None] | None = None
        self._error = ""
        self._t0 = time.monotonic()

    @classmethod
    async def open(cls, cfg: KvTransferConfig, reservation: Reservation, request_id: str,
                   buf: np.ndarray, num_layers: int, checksum: bool,
                   this_host: str) -> LayerPush | None:
        """Start a layered push, or None when the planned path is not tcp."""
        eps = endpoints_of(list(reservation.endpoints),
                           reservation.data_address)
        best, _ = plan(cfg, eps, this_host)
        if best.transport != "tcp" or len(buf) <= HEADER_BYTES or num_layers <= 0:
            return None
        push = cls(cfg, reservation, request_id, buf, num_layers, checksum)
        push.address = best.address
        try:
            async with asyncio.timeout(cfg.kv_transfer_timeout_s):
                push._sock = await connect_tcp(best.address)
                flags = FLAG_RETRYABLE if cfg.kv_fallback else 0
                await push._loop.sock_sendall(push._sock, pack_req(
                    Op.PUT_LAYERS, push.handle, request_id, len(buf), push.layer_nbytes,
                    flags))
                await read_resp(push._loop, push._sock)  # the one metadata exchange
        except (TransferError, OSError, TimeoutError) as e:
            if isinstance(e, TransferError) and not e.retryable:
                push.abort()
                raise Unavailable(f"KV push failed: {e}", reason="KV_TRANSFER_FAILED",
                                  metadata={"request_id": request_id}) from e
            push._fail(f"tcp layered push could not start: {e or 'timed out'}")
            return push
        push._sender = asyncio.create_task(push._send_layers(), name=f"kv-layers-{request_id}")
        return push

    def layer_done(self, layer: int) -> None:
        """Thread-safe: layer ``layer`` is packed in ``buf`` (layers arrive in order)."""
        self._loop.call_soon_threadsafe(self._ready.put_nowait, layer)

    def _layer(self, i: int) -> memoryview:
        off = HEADER_BYTES + i * self.layer_nbytes
        return byte_view(self.buf)[off : off + self.layer_nbytes]

    async def _send_layers(self) -> None:
        assert self._sock is not None
        try:
            for i in range(self.num_layers):
                got = await self._ready.get()
                if got != i:
                    raise TransferError(f"layer {got} arrived before layer {i}")
                view = self._layer(i)
                if self.checksum:  # ~0.1 ms per 6 MB layer (ISA-L)
                    self.crc = payload_crc32(view, self.crc)
                async with asyncio.timeout(self.cfg.kv_transfer_timeout_s):
                    await self._loop.sock_sendall(self._sock, view)
                self.layers_sent += 1
        except (TransferError, OSError, TimeoutError) as e:
            self._fail(f"tcp layered push broke after {self.layers_sent} of "
                       f"{self.num_layers} layers: {e or 'timed out'}")

    def _fail(self, msg: str) -> None:
        self._error = self._error or msg
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def payload_crc(self) -> int:
        """The payload's crc32 once every layer is in (-1 without checksums)."""
        if not self.checksum:
            return -1
        if self.layers_sent == self.num_layers:
            return self.crc
        return payload_crc32(byte_view(self.buf)[HEADER_BYTES:])  # the stream broke early

    async def finish(self, header: Callable[[int], bytes],
                     timeout_s: float | None = None) -> TransferResult:
        """Send what is left and the header (``header(payload_crc)``, which must also
        write it into ``buf``); fall back to one whole-buffer tcp push if the stream
        broke."""
        budget = min(self.cfg.kv_transfer_timeout_s, timeout_s) if timeout_s else \
            self.cfg.kv_transfer_timeout_s
        t_finish = time.monotonic()
        try:
            async with asyncio.timeout(budget):
                if self._sender is not None:
                    await self._sender
                hdr = header(self.payload_crc())
                if not self._error:
                    assert self._sock is not None
                    try:
                        await self._loop.sock_sendall(self._sock, hdr)
                        await read_resp(self._loop, self._sock)
                    except (TransferError, OSError) as e:
                        if isinstance(e, TransferError) and not e.retryable:
                            raise Unavailable(f"KV push failed: {e}",
                                              reason="KV_TRANSFER_FAILED",
                                              metadata={"request_id": self.request_id}) from e
                        self._fail(f"tcp layered push broke at the header: {e}")
        except TimeoutError as e:
            self.abort()
            STATS.record(None)
            raise DeadlineExceeded(f"KV push timed out after {budget:.2f} s",
                                   reason="KV_TRANSFER_TIMEOUT",
                                   metadata={"request_id": self.request_id}) from e
        finally:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
        if not self._error:
            result = TransferResult("tcp", planned="tcp", ms=(time.monotonic() - self._t0) * 1e3)
            STATS.record(result)
            return result
        return await self._fallback(budget - (time.monotonic() - t_finish))

    async def _fallback(self, left: float) -> TransferResult:
        if not self.cfg.kv_fallback:
            STATS.record(None)
            raise Unavailable(f"KV push failed: {self._error}", reason="KV_TRANSFER_FAILED",
                              metadata={"request_id": self.request_id})
        log.warning("KV push of %s: %s; pushing the whole buffer once on tcp (fallback)",
                    self.request_id, self._error)
        try:
            async with asyncio.timeout(max(left, 0.001)):
                await TcpTransport().put(self.address, self.handle, self.request_id,
                                         byte_view(self.buf), FLAG_FALLBACK)
        except (TransferError, TimeoutError) as e:
            STATS.record(None)
            msg = f"KV push failed: {self._error}; then tcp push: {e or 'timed out'}"
            if isinstance(e, TimeoutError):
                raise DeadlineExceeded(msg, reason="KV_TRANSFER_TIMEOUT",
                                       metadata={"request_id": self.request_id}) from e
            raise Unavailable(msg, reason="KV_TRANSFER_FAILED",
                              metadata={"request_id": self.request_id}) from e
        result = TransferResult("tcp", fallback=True, planned="tcp", error=self._error,
                                ms=(time.monotonic() - self._t0) * 1e3)
        STATS.record(result)
        return result

    def abort(self) -> None:
        """Compute failed or was cancelled: stop sending and close the connection."""
        if self._sender is not None:
            self._sender.cancel()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


__all__ = ["LayerPush"]
