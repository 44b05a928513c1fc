"""``tcp``: our own asyncio data channel on raw non-blocking sockets.

Bytes go straight from the sender's buffer to the receiver's preallocated buffer
(``sock_sendall`` / ``sock_recv_into``), with no intermediate copies.

Protocol, little-endian; one transfer per connection:
  client -> server  REQ   magic "PDKT", version u8, op u8 (1 PUT, 2 GET),
                          handle 16 bytes, request_id length u16, nbytes u64, request_id
  server -> client  RESP  status u8, nbytes u64, message length u16, message
  PUT: after RESP ok (the single metadata exchange) the client streams nbytes, then the
       server sends a final RESP once the bytes are in place.
  GET: RESP ok is followed by nbytes of payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import struct

from services.common.tasks import cancel_and_wait
from services.common.transport.base import KvDataHandler, KvTransport, TransferError

log = logging.getLogger(__name__)

_REQ = struct.Struct("<4sBB16sHQ")
_RESP = struct.Struct("<BQH")
MAGIC = b"PDKT"
VERSION = 1
OP_PUT, OP_GET = 1, 2
CHUNK = 4 << 20


class Status(enum.IntEnum):
    OK = 0
    NOT_FOUND = 1
    BAD_STATE = 2
    SIZE_MISMATCH = 3
    PROTOCOL = 4
    IO_ERROR = 5


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise TransferError(f"bad data address {address!r}, expected host:port")
    return host.strip("[]"), int(port)


async def _recv_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    await _recv_into(loop, sock, memoryview(buf))
    return bytes(buf)


async def _recv_into(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, view: memoryview
) -> None:
    got, n = 0, len(view)
    while got < n:
        r = await loop.sock_recv_into(sock, view[got : min(n, got + CHUNK)])
        if r == 0:
            raise TransferError(f"peer closed the data channel after {got} of {n} bytes")
        got += r


def _resp(status: Status, nbytes: int = 0, message: str = "") -> bytes:
    msg = message.encode()[:1024]
    return _RESP.pack(status, nbytes, len(msg)) + msg


async def _read_resp(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> tuple[int, int]:
    status, nbytes, mlen = _RESP.unpack(await _recv_exact(loop, sock, _RESP.size))
    message = (await _recv_exact(loop, sock, mlen)).decode(errors="replace") if mlen else ""
    if status != Status.OK:
        raise TransferError(f"kvstore refused the transfer: {message}", status)
    return status, nbytes


async def _connect(address: str) -> socket.socket:
    host, port = split_address(address)
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    err: OSError | None = None
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await loop.sock_connect(sock, addr)
            return sock
        except OSError as e:
            sock.close()
            err = e
    raise TransferError(f"cannot connect to data channel {address}: {err}")


class TcpTransport(KvTransport):
    name = "tcp"

    async def put(self, address: str, handle: str, request_id: str, data: memoryview) -> None:
        loop = asyncio.get_running_loop()
        sock = await _connect(address)
        try:
            rid = request_id.encode()
            req = _REQ.pack(MAGIC, VERSION, OP_PUT, bytes.fromhex(handle), len(rid), len(data))
            await loop.sock_sendall(sock, req + rid)
            await _read_resp(loop, sock)  # the one metadata exchange
            await loop.sock_sendall(sock, data)
            await _read_resp(loop, sock)
        except OSError as e:
            raise TransferError(f"KV push to {address} failed: {e}") from e
        finally:
            sock.close()

    async def get(self, address: str, handle: str, request_id: str) -> memoryview:
        loop = asyncio.get_running_loop()
        sock = await _connect(address)
        try:
            rid = request_id.encode()
            req = _REQ.pack(MAGIC, VERSION, OP_GET, bytes.fromhex(handle), len(rid), 0)
            await loop.sock_sendall(sock, req + rid)
            _, nbytes = await _read_resp(loop, sock)
            buf = bytearray(nbytes)
            view = memoryview(buf)
            await _recv_into(loop, sock, view)
            return view
        except OSError as e:
            raise TransferError(f"KV fetch from {address} failed: {e}") from e
        finally:
            sock.close()


class TcpDataServer:
    """The kvstore's listening side of the ``tcp`` transport."""

    def __init__(self, handler: KvDataHandler) -> None:
        self._handler = handler
        self._sock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, type_, proto, _, addr = infos[0]
        sock = socket.socket(family, type_, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(256)
        sock.setblocking(False)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._accept_task = asyncio.create_task(self._accept_loop(), name="kv-data-accept")
        return self.port

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.create_task(self._serve(conn))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            raw = await _recv_exact(loop, conn, _REQ.size)
            magic, version, op, handle_b, rid_len, nbytes = _REQ.unpack(raw)
            if magic != MAGIC or version != VERSION or op not in (OP_PUT, OP_GET):
                await loop.sock_sendall(conn, _resp(Status.PROTOCOL, 0, "bad request header"))
                return
            request_id = (await _recv_exact(loop, conn, rid_len)).decode(errors="replace")
            handle = handle_b.hex()
            if op == OP_PUT:
                await self._serve_put(loop, conn, handle, request_id, nbytes)
            else:
                await self._serve_get(loop, conn, handle, request_id)
        except (TransferError, OSError) as e:
            log.info("data channel transfer aborted: %s", e)
        finally:
            conn.close()

    async def _serve_put(
        self, loop: asyncio.AbstractEventLoop, conn: socket.socket, handle: str,
        request_id: str, nbytes: int,
    ) -> None:
        try:
            target = self._handler.begin_put(handle, request_id, nbytes)
        except TransferError as e:
            await loop.sock_sendall(conn, _resp(Status(max(e.status, 1)), 0, str(e)))
            return
        ok = False
        try:
            await loop.sock_sendall(conn, _resp(Status.OK, nbytes))
            await _recv_into(loop, conn, target)
            ok = True
        finally:
            try:
                self._handler.end_put(handle, ok)
            except TransferError as e:
                ok = False
                with contextlib.suppress(OSError):
                    await loop.sock_sendall(conn, _resp(Status(max(e.status, 1)), 0, str(e)))
        if ok:
            await loop.sock_sendall(conn, _resp(Status.OK, nbytes))

    async def _serve_get(
        self, loop: asyncio.AbstractEventLoop, conn: socket.socket, handle: str, request_id: str
    ) -> None:
        try:
            source = self._handler.begin_get(handle, request_id)
        except TransferError as e:
            await loop.sock_sendall(conn, _resp(Status(max(e.status, 1)), 0, str(e)))
            return
        ok = False
        try:
            await loop.sock_sendall(conn, _resp(Status.OK, len(source)))
            await loop.sock_sendall(conn, source)
            ok = True
        finally:
            self._handler.end_get(handle, ok)

    async def close(self) -> None:
        if self._accept_task is not None:
            await cancel_and_wait(self._accept_task)
        for t in list(self._conns):
            t.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
