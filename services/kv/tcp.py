"""``tcp``: our own asyncio data channel on raw non-blocking sockets.

Bytes go straight from the sender's buffer to the receiver's preallocated buffer
(``sock_sendall`` / ``sock_recv_into``), with no intermediate copies. The wire
protocol is in ``wire``; the kvstore's side is ``server.DataServer``.

A held fetch (``open_get``, decode's ``fetch_kv``) receives into a pooled buffer that
goes back to ``RECV_POOL`` once the decode has copied out of it, so fetches land in warm
pages; a fetch whose reader may still be live (cancelled) is never pooled.

Block-fixed mode (``block_bytes`` > 0) moves the same bytes in fixed blocks and waits
for the receiver's confirmation of each block before sending the next, as a paged
transfer does; it exists to measure what P/D-Serve's block-free transfer saves.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import socket

import numpy as np

from services.kv.base import KvLease, KvTransport, Status, TransferError
from services.kv.connpool import POOL
from services.kv.layout import byte_view
from services.kv.wire import (
    Op,
    pack_req,
    pack_resp,
    read_resp,
    recv_into,
    split_address,
)

__all__ = ["RECV_POOL", "RecvPool", "Status", "TcpLease", "TcpTransport", "recv_blocks",
           "send_blocks", "split_address"]


async def send_blocks(loop: asyncio.AbstractEventLoop, sock: socket.socket, data: memoryview,
                      block_bytes: int) -> None:
    """Send ``data`` block by block, each confirmed by a RESP before the next."""
    for off in range(0, len(data), block_bytes):
        await loop.sock_sendall(sock, data[off : off + block_bytes])
        await read_resp(loop, sock, "receiver")


async def recv_blocks(loop: asyncio.AbstractEventLoop, sock: socket.socket, view: memoryview,
                      block_bytes: int) -> None:
    for off in range(0, len(view), block_bytes):
        await recv_into(loop, sock, view[off : off + block_bytes])
        await loop.sock_sendall(sock, pack_resp(Status.OK))


class RecvPool:
    """Warm receive buffers for held tcp fetches (``open_get``): a buffer comes back once
    the decode's RecvScatter has copied out of it, so the next fetch lands in pages that
    are already faulted in. Anonymous mmaps: ``resize`` to the same size raises while
    any view of one is alive, which proves nothing reads it before it is reused."""

    def __init__(self, capacity: int = 1 << 30) -> None:
        self.capacity = capacity
        self._idle: list[mmap.mmap] = []
        self.bytes = 0
        self.reused = 0

    def take(self, nbytes: int) -> mmap.mmap:
        fits = [m for m in self._idle if nbytes <= len(m) <= nbytes * 1.25]
        if fits:
            mm = min(fits, key=len)
            self._idle.remove(mm)
            self.bytes -= len(mm)
            self.reused += 1
            return mm
        return mmap.mmap(-1, nbytes)

    def give(self, mm: mmap.mmap) -> bool:
        """Pool ``mm`` if nothing references it any more; False (left to GC) otherwise."""
        try:
            mm.resize(len(mm))  # raises BufferError while a view of it exists
        except BufferError:
            return False
        if len(mm) > self.capacity:
            mm.close()
            return True
        self._idle.append(mm)
        self.bytes += len(mm)
        while self.bytes > self.capacity:
            old = self._idle.pop(0)
            self.bytes -= len(old)
            old.close()
        return True


RECV_POOL = RecvPool()


class TcpLease(KvLease):
    """A fetched buffer from ``RECV_POOL``: back to the pool on release, never on abort."""

    def __init__(self, mm: mmap.mmap, nbytes: int) -> None:
        super().__init__(memoryview(mm)[:nbytes])
        self._mm: mmap.mmap | None = mm

    async def release(self, timeout_s: float = 5.0) -> None:
        mm, self._mm = self._mm, None
        if mm is not None:
            await self._drop_view(lambda: RECV_POOL.give(mm))

    def abort(self) -> None:
        self._mm = None  # a thread may still read it: left to GC, never reused


class TcpTransport(KvTransport):
    name = "tcp"

    def __init__(self, recv_pool_bytes: int | None = None) -> None:
        if recv_pool_bytes is not None:
            RECV_POOL.capacity = recv_pool_bytes

    async def put(self, address: str, handle: str, request_id: str, data: memoryview,
                  flags: int = 0, block_bytes: int = 0) -> None:
        loop = asyncio.get_running_loop()
        sock: socket.socket | None = None
        done = False
        try:
            op = Op.PUT_BLOCKS if block_bytes else Op.PUT
            sock, _ = await POOL.open_exchange(  # the one metadata exchange
                "tcp", address, pack_req(op, handle, request_id, len(data), block_bytes, flags),
                lambda s: read_resp(loop, s))
            if block_bytes:
                await send_blocks(loop, sock, data, block_bytes)
            else:
                await loop.sock_sendall(sock, data)
            await read_resp(loop, sock)
            done = True
        except OSError as e:
            raise TransferError(f"KV push to {address} failed: {e}") from e
        finally:
            if sock is not None:
                if done:  # every exchange completed: it may carry the next transfer
                    POOL.give_back("tcp", address, sock)
                else:
                    sock.close()

    async def get(self, address: str, handle: str, request_id: str, flags: int = 0,
                  block_bytes: int = 0) -> memoryview:
        return await self._get(address, handle, request_id, flags, block_bytes, None)

    async def open_get(self, address: str, handle: str, request_id: str, flags: int = 0,
                       block_bytes: int = 0) -> KvLease:
        mm: list[mmap.mmap] = []
        view = await self._get(address, handle, request_id, flags, block_bytes, mm)
        return TcpLease(mm[0], len(view))

    async def _get(self, address: str, handle: str, request_id: str, flags: int,
                   block_bytes: int, pooled: list[mmap.mmap] | None) -> memoryview:
        """``pooled``: receive into a ``RECV_POOL`` buffer (appended to the list)."""
        loop = asyncio.get_running_loop()
        sock: socket.socket | None = None
        done = False
        try:
            op = Op.GET_BLOCKS if block_bytes else Op.GET
            sock, (nbytes, info) = await POOL.open_exchange(
                "tcp", address, pack_req(op, handle, request_id, 0, block_bytes, flags),
                lambda s: read_resp(loop, s))
            if pooled is not None:
                pooled.append(RECV_POOL.take(nbytes))
                view = memoryview(pooled[0])[:nbytes]
            else:
                view = byte_view(np.empty(nbytes, dtype=np.uint8))  # no zero-fill
            if block_bytes:  # asked in tokens; the answer says the page size in bytes
                await recv_blocks(loop, sock, view, int(info or block_bytes))
            else:
                await recv_into(loop, sock, view)
            done = True
            return view
        except OSError as e:
            raise TransferError(f"KV fetch from {address} failed: {e}") from e
        finally:
            if sock is not None:
                if done:  # the whole payload arrived: nothing of it is left on the wire
                    POOL.give_back("tcp", address, sock)
                else:
                    with contextlib.suppress(OSError):
                        sock.close()
