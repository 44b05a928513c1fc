"""``shm``: same-host shared memory, by passing a memfd over a Unix socket.

The kvstore keeps every staged buffer in a memfd (``services.kvstore.memory``). On the
kvstore's Unix socket, after the REQ/RESP metadata exchange, the RESP carries that
buffer's file descriptor (SCM_RIGHTS):

  push:  the prefill copies its packed KV into the memfd's pages (one copy), then answers
         DONE. It keeps its mapping of a memfd (``MappingCache``, keyed by inode): the
         kvstore pools its buffers, so the next push into the same memfd copies into
         pages that are mapped already (a fresh mapping of 189 MB costs about 2x the copy
         in page-table set-up alone). Into a cached mapping the copy runs on the event
         loop in slices (no thread hop); a first mapping is made and filled on a thread.
  fetch: the decode maps it privately, answers DONE (mapped: the entry is CONSUMED)
         and reads the pages in place. With ``open_get`` (``negotiate.fetch_kv``) it
         keeps the connection open and, once it has copied the KV out (RecvScatter into
         its paged pool) and unmapped, says RELEASED: the kvstore returns the memfd to its
         pool. A decode that is cancelled or dies mid-restore never says RELEASED, and the
         kvstore closes the memfd instead of reusing it, so no page is rewritten under a
         live reader. ``get`` (a caller that keeps the mapping) never says RELEASED.

Reaching the Unix socket proves the two processes share a kernel, so shm is never
chosen across hosts by mistake: a failed connect is a fallback to tcp, and visible.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import socket
import threading
from collections import OrderedDict

import numpy as np

from services.kv.base import KvLease, KvTransport, Status, TransferError
from services.kv.connpool import POOL
from services.kv.wire import (
    DONE_RELEASED,
    RESP,
    Op,
    pack_req,
    pack_resp,
    read_resp,
    recv_exact,
    wait_readable,
)

log = logging.getLogger(__name__)
# A push into a memfd this process has not mapped yet maps (MAP_POPULATE) and copies on a
# thread when it is larger than this (numpy releases the GIL), not on the event loop.
THREAD_COPY_BYTES = 8 << 20
# A push into a mapping this process holds already (the common case: the kvstore pools its
# memfds) copies on the event loop, in slices of this many bytes with a yield between them
# (about 1 ms each here). No thread hop: on a loaded host, waking a worker thread and then
# the loop again cost milliseconds of run-queue wait per push, on top of the copy.
COPY_SLICE_BYTES = 16 << 20


async def send_fd(loop: asyncio.AbstractEventLoop, sock: socket.socket, data: bytes,
                  fd: int) -> None:
    while True:
        try:
            socket.send_fds(sock, [data], [fd])
            return
        except BlockingIOError:
            fut = loop.create_future()
            loop.add_writer(sock.fileno(), fut.set_result, None)
            try:
                await fut
            finally:
                loop.remove_writer(sock.fileno())


async def recv_resp_fd(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> tuple[int, int]:
    """Read one RESP that carries a descriptor; returns (nbytes, fd)."""
    await wait_readable(loop, sock)
    msg, fds, _, _ = socket.recv_fds(sock, RESP.size, 1)
    if not msg:
        raise TransferError("kvstore closed the shm channel", Status.BROKEN)
    try:
        if len(msg) < RESP.size:
            msg += await recv_exact(loop, sock, RESP.size - len(msg))
        status, nbytes, ilen = RESP.unpack(msg)
        if status != Status.OK:
            info = (await recv_exact(loop, sock, ilen)).decode(errors="replace") if ilen else ""
            raise TransferError(f"kvstore refused the shm transfer: {info}", status)
        if not fds:
            raise TransferError("kvstore sent no shared-memory descriptor", Status.PROTOCOL)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return nbytes, fds[0]


def _map(fd: int, nbytes: int, writable_shared: bool) -> mmap.mmap:
    try:
        # The producer's mapping is populated up front: one kernel call instead of a
        # minor fault per 4 KiB page, which on a fresh mapping cost more than the copy.
        flags = (mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0) if writable_shared
                 else mmap.MAP_PRIVATE)
        return mmap.mmap(fd, nbytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


class MappingCache:
    """This process's writable mappings of kvstore memfds, by inode, least recently used
    first out past ``capacity`` bytes.

    Safe because the kvstore hands a memfd to one transfer at a time and a push writes
    only while it holds it. An inode number cannot be reused while we map it. The cost:
    a memfd the kvstore has retired stays allocated while it is cached here (at most
    ``capacity`` bytes; ``kv_client_cache_mb``)."""

    def __init__(self, capacity: int = 1 << 30) -> None:
        self.capacity = capacity
        self._maps: OrderedDict[tuple[int, int], mmap.mmap] = OrderedDict()
        self._lock = threading.Lock()  # pushes map and copy on executor threads
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def cached(self, fd: int, nbytes: int) -> mmap.mmap | None:
        """The cached mapping of ``fd`` (then closed here) if it holds ``nbytes``, else None
        (``fd`` stays open for ``acquire``)."""
        st = os.fstat(fd)
        with self._lock:
            mm = self._maps.get((st.st_dev, st.st_ino))
            if mm is None or len(mm) < nbytes:
                return None
            self._maps.move_to_end((st.st_dev, st.st_ino))
            self.hits += 1
        os.close(fd)
        return mm

    def acquire(self, fd: int, nbytes: int) -> tuple[mmap.mmap, bool]:
        """A writable mapping of at least ``nbytes`` of ``fd`` (closed here); True when it
        is cached (the caller must not close it)."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        with self._lock:
            mm = self._maps.get(key)
            if mm is not None and len(mm) >= nbytes:
                self._maps.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
                if mm is not None:  # the file grew (the kvstore does not do that today)
                    self._evict(key)
                mm = None
        if mm is not None:
            os.close(fd)
            return mm, True
        size = max(st.st_size, nbytes)
        if size > self.capacity:
            return _map(fd, nbytes, writable_shared=True), False
        mm = _map(fd, size, writable_shared=True)  # outside the lock: it takes a while
        with self._lock:
            if key in self._maps:
                self._evict(key)
            self._maps[key] = mm
            self.bytes += size
            while self.bytes > self.capacity:
                self._evict(next(iter(self._maps)))
        return mm, True

    def _evict(self, key: tuple[int, int]) -> None:
        # Dropped, not closed: a copy still running on another thread keeps its mapping
        # until it is done, and the unmap follows the last reference.
        self.bytes -= len(self._maps.pop(key))

    def clear(self) -> None:
        with self._lock:
            while self._maps:
                self._evict(next(iter(self._maps)))


MAPPINGS = MappingCache()


def _copy_into(mm: mmap.mmap, data: memoryview, close: bool) -> None:
    """Copy ``data`` to the start of the mapping (before DONE: the kvstore owns the pages
    again once it has the DONE)."""
    dst = np.frombuffer(mm, dtype=np.uint8, count=len(data))
    try:
        np.copyto(dst, np.frombuffer(data, dtype=np.uint8))
    finally:
        del dst
        if close:
            mm.close()


async def _copy_sliced(mm: mmap.mmap, data: memoryview) -> None:
    """``_copy_into`` on the event loop, yielding between slices. Cancelled between two
    slices, it stops: nothing lands after the caller gives the buffer back."""
    dst = np.frombuffer(mm, dtype=np.uint8, count=len(data))
    src = np.frombuffer(data, dtype=np.uint8)
    try:
        for i in range(0, len(src), COPY_SLICE_BYTES):
            np.copyto(dst[i : i + COPY_SLICE_BYTES], src[i : i + COPY_SLICE_BYTES])
            if i + COPY_SLICE_BYTES < len(src):
                await asyncio.sleep(0)
    finally:
        del dst


class ShmLease(KvLease):
    """A fetched memfd mapping; ``release`` unmaps it and tells the kvstore it may reuse
    the pages, ``abort`` leaves them to the kvstore to close (never reused)."""

    def __init__(self, sock: socket.socket, mm: mmap.mmap, address: str) -> None:
        super().__init__(memoryview(mm))  # mapped with exactly the staged size
        self._sock: socket.socket | None = sock
        self._mm = mm
        self._address = address

    async def release(self, timeout_s: float = 5.0) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        def unmap() -> bool:
            # Raises while anything built on the mapping (a numpy array, a tensor) is
            # alive: then it may still be read, and the kvstore must not reuse it.
            self._mm.close()
            return True

        unmapped = await self._drop_view(unmap)
        if not unmapped:
            log.warning("shm fetch: the KV mapping is still referenced at release; the "
                        "kvstore will close the buffer instead of reusing it")
        done = False
        try:
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(timeout_s):
                await loop.sock_sendall(sock, pack_resp(
                    Status.OK, DONE_RELEASED if unmapped else 0))
                await read_resp(loop, sock)
            done = True
        except (OSError, TransferError, TimeoutError) as e:
            # The KV is copied out and its entry CONSUMED: only the pages' reuse is lost
            # (the kvstore closes the memfd instead).
            log.warning("shm fetch: confirming the release failed: %s", e or "timed out")
        finally:
            if done:  # the fetch's last exchange completed: the connection is clean
                POOL.give_back("unix", self._address, sock)
            else:
                sock.close()

    def abort(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()  # no DONE: the kvstore closes the memfd (close on doubt)


class ShmTransport(KvTransport):
    name = "shm"

    def __init__(self, map_cache_bytes: int | None = None) -> None:
        if map_cache_bytes is not None:
            MAPPINGS.capacity = map_cache_bytes

    async def put(self, address: str, handle: str, request_id: str, data: memoryview,
                  flags: int = 0, block_bytes: int = 0) -> None:
        loop = asyncio.get_running_loop()
        sock: socket.socket | None = None
        done = False
        try:
            sock, (nbytes, fd) = await POOL.open_exchange(
                "unix", address, pack_req(Op.PUT_SHM, handle, request_id, len(data), 0, flags),
                lambda s: recv_resp_fd(loop, s))
            if nbytes != len(data):
                os.close(fd)
                raise TransferError(f"kvstore offered {nbytes} bytes for {len(data)}",
                                    Status.SIZE_MISMATCH)
            mm = MAPPINGS.cached(fd, len(data))
            if mm is not None:
                await _copy_sliced(mm, data)
            elif len(data) > THREAD_COPY_BYTES:  # map and copy off the event loop
                copy = asyncio.ensure_future(asyncio.to_thread(self._fill, fd, data))
                try:
                    await asyncio.shield(copy)
                except asyncio.CancelledError:
                    # No byte may land after the kvstore took the buffer back (a tcp retry
                    # writes into it): wait for the copy before the connection closes.
                    with contextlib.suppress(BaseException):
                        await copy
                    raise
            else:
                self._fill(fd, data)
            await loop.sock_sendall(sock, pack_resp(Status.OK))  # DONE
            await read_resp(loop, sock)
            done = True
        except OSError as e:
            raise TransferError(f"KV push over shm failed: {e}") from e
        finally:
            if sock is not None:
                # Only a push whose every exchange completed carries the next one.
                if done:
                    POOL.give_back("unix", address, sock)
                else:
                    sock.close()

    @staticmethod
    def _fill(fd: int, data: memoryview) -> None:
        mm, cached = MAPPINGS.acquire(fd, len(data))
        _copy_into(mm, data, close=not cached)

    async def open_get(self, address: str, handle: str, request_id: str, flags: int = 0,
                       block_bytes: int = 0) -> KvLease:
        loop = asyncio.get_running_loop()
        sock: socket.socket | None = None
        try:
            sock, (nbytes, fd) = await POOL.open_exchange(
                "unix", address, pack_req(Op.GET_SHM, handle, request_id, 0, 0, flags),
                lambda s: recv_resp_fd(loop, s))
            mm = _map(fd, nbytes, writable_shared=False)
            try:
                await loop.sock_sendall(sock, pack_resp(Status.OK))  # DONE: mapped
                await read_resp(loop, sock)  # the entry is CONSUMED
            except BaseException:
                mm.close()
                raise
        except OSError as e:
            if sock is not None:
                sock.close()
            raise TransferError(f"KV fetch over shm failed: {e}") from e
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        return ShmLease(sock, mm, address)

    async def get(self, address: str, handle: str, request_id: str, flags: int = 0,
                  block_bytes: int = 0) -> memoryview:
        """The mapping itself, kept by the caller: never RELEASED, so never reused. It
        lives as long as the returned view (and what is built on it)."""
        lease = await self.open_get(address, handle, request_id, flags, block_bytes)
        lease.abort()
        return lease.view
