"""``tcp``: our own asyncio data channel on raw non-blocking sockets.

Bytes go straight from the sender's buffer to the receiver's preallocated buffer
(``sock_sendall`` / ``sock_recv_into``), with no intermediate copies. The wire
protocol is in ``wire``; the kvstore's side is ``server.DataServer``.

Block-fixed mode (``block_bytes`` > 0) moves the same bytes in fixed blocks and waits
for the receiver's confirmation of each block before sending the next, as a paged
transfer does; it exists to measure what P/D-Serve's block-free transfer saves.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import numpy as np

from services.common.transport.base import KvTransport, Status, TransferError
from services.common.transport.wire import (
    Op,
    connect_tcp,
    pack_req,
    pack_resp,
    read_resp,
    recv_into,
    split_address,
)

__all__ = ["Status", "TcpTransport", "recv_blocks", "send_blocks", "split_address"]


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


class TcpTransport(KvTransport):
    name = "tcp"

    async def put(self, address: str, handle: str, request_id: str, data: memoryview,
                  flags: int = 0, block_bytes: int = 0) -> None:
        loop = asyncio.get_running_loop()
        sock = await connect_tcp(address)
        try:
            op = Op.PUT_BLOCKS if block_bytes else Op.PUT
            await loop.sock_sendall(sock, pack_req(op, handle, request_id, len(data),
                                                   block_bytes, flags))
            await read_resp(loop, sock)  # the one metadata exchange
            if block_bytes:
                await send_blocks(loop, sock, data, block_bytes)
            else:
                await loop.sock_sendall(sock, data)
            await read_resp(loop, sock)
        except OSError as e:
            raise TransferError(f"KV push to {address} failed: {e}") from e
        finally:
            sock.close()

    async def get(self, address: str, handle: str, request_id: str, flags: int = 0,
                  block_bytes: int = 0) -> memoryview:
        loop = asyncio.get_running_loop()
        sock = await connect_tcp(address)
        try:
            op = Op.GET_BLOCKS if block_bytes else Op.GET
            await loop.sock_sendall(sock, pack_req(op, handle, request_id, 0, block_bytes,
                                                   flags))
            nbytes, info = await read_resp(loop, sock)
            view = memoryview(np.empty(nbytes, dtype=np.uint8))  # no zero-fill
            if block_bytes:  # asked in tokens; the answer says the page size in bytes
                await recv_blocks(loop, sock, view, int(info or block_bytes))
            else:
                await recv_into(loop, sock, view)
            return view
        except OSError as e:
            raise TransferError(f"KV fetch from {address} failed: {e}") from e
        finally:
            with contextlib.suppress(OSError):
                sock.close()
