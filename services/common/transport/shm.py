"""``shm``: same-host shared memory, by passing a memfd over a Unix socket.

The kvstore keeps every staged buffer in a memfd (``services.kvstore.memory``). On the
kvstore's Unix socket, after the REQ/RESP metadata exchange, the RESP carries that
buffer's file descriptor (SCM_RIGHTS):

  push:  the prefill maps it and copies its packed KV in (one copy), then answers DONE;
  fetch: the decode maps it privately (copy-on-write) and uses the pages in place (no
         copy), then answers DONE, and the kvstore drops its reference.

Reaching the Unix socket proves the two processes share a kernel, so shm is never
chosen across hosts by mistake: a failed connect is a fallback to tcp, and visible.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import socket

import numpy as np

from services.common.transport.base import KvTransport, Status, TransferError
from services.common.transport.wire import (
    RESP,
    Op,
    connect_unix,
    pack_req,
    pack_resp,
    read_resp,
    recv_exact,
)

# Copies larger than this run on a thread (numpy releases the GIL), not on the event loop.
THREAD_COPY_BYTES = 8 << 20


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
    fut = loop.create_future()
    loop.add_reader(sock.fileno(), lambda: fut.done() or fut.set_result(None))
    try:
        await fut
    finally:
        loop.remove_reader(sock.fileno())
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


def _fill(fd: int, data: memoryview) -> None:
    """Map the kvstore's buffer, copy ``data`` in, unmap (before DONE: the kvstore may
    reuse these pages once it has the DONE)."""
    mm = _map(fd, len(data), writable_shared=True)
    try:
        dst = np.frombuffer(mm, dtype=np.uint8)
        np.copyto(dst, np.frombuffer(data, dtype=np.uint8))
        del dst
    finally:
        mm.close()


class ShmTransport(KvTransport):
    name = "shm"

    async def put(self, address: str, handle: str, request_id: str, data: memoryview,
                  flags: int = 0, block_bytes: int = 0) -> None:
        loop = asyncio.get_running_loop()
        sock = await connect_unix(address)
        try:
            await loop.sock_sendall(sock, pack_req(Op.PUT_SHM, handle, request_id, len(data),
                                                   0, flags))
            nbytes, fd = await recv_resp_fd(loop, sock)
            if nbytes != len(data):
                os.close(fd)
                raise TransferError(f"kvstore offered {nbytes} bytes for {len(data)}",
                                    Status.SIZE_MISMATCH)
            if len(data) > THREAD_COPY_BYTES:  # map, copy and unmap off the event loop
                await asyncio.to_thread(_fill, fd, data)
            else:
                _fill(fd, data)
            await loop.sock_sendall(sock, pack_resp(Status.OK))  # DONE
            await read_resp(loop, sock)
        except OSError as e:
            raise TransferError(f"KV push over shm failed: {e}") from e
        finally:
            sock.close()

    async def get(self, address: str, handle: str, request_id: str, flags: int = 0,
                  block_bytes: int = 0) -> memoryview:
        loop = asyncio.get_running_loop()
        sock = await connect_unix(address)
        try:
            await loop.sock_sendall(sock, pack_req(Op.GET_SHM, handle, request_id, 0, 0, flags))
            nbytes, fd = await recv_resp_fd(loop, sock)
            mm = _map(fd, nbytes, writable_shared=False)
            await loop.sock_sendall(sock, pack_resp(Status.OK))  # DONE: mapped
            await read_resp(loop, sock)
            # The mapping lives as long as the returned view (and what is built on it).
            return memoryview(mm)
        except OSError as e:
            raise TransferError(f"KV fetch over shm failed: {e}") from e
        finally:
            sock.close()
