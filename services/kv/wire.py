"""The data-channel wire protocol, shared by every transport's client and the kvstore server.

Transfers run one at a time on a connection (TCP, or a Unix socket for ``shm``); after
one that completed OK the connection may carry the next REQ (``connpool``), after any
error it is closed. Little-endian:

  client -> server  REQ   magic "PDKT", version u8, op u8, flags u8, handle 16 bytes,
                          request_id length u16, nbytes u64, block_bytes u64, then request_id
  server -> client  RESP  status u8, nbytes u64, info length u16, info (error text, or what
                          the op needs: the Mooncake segment and address for rdma)

Ops (each starts with REQ -> RESP, the single metadata exchange):
  PUT / GET          tcp: the payload follows on the same socket; PUT ends with a final RESP.
  PUT_BLOCKS / GET_BLOCKS  block-fixed mode: the payload moves in fixed pages (N tokens of
                     one layer) and the receiver confirms each one with a RESP before the
                     next is sent. PUT_BLOCKS: ``block_bytes`` is the page size; GET_BLOCKS:
                     it is N, and the RESP info gives the page size the server derived
                     from the staged header.
  PUT_SHM / GET_SHM  Unix socket only: RESP carries a memfd (SCM_RIGHTS); the client maps it
                     and answers DONE (a RESP) when it has written or mapped the bytes.
                     After a GET_SHM's final RESP the client may send one more RESP: nbytes
                     DONE_RELEASED says it has copied the bytes out and unmapped, so the
                     kvstore may reuse the memfd (it answers with a RESP). Anything else,
                     or a closed connection, makes the kvstore close the memfd instead.
  PUT_LAYERS         per-layer transfer (``layers``): like PUT, but the payload comes first,
                     in layers of ``block_bytes`` as prefill computes them, and the 512-byte
                     KV header (with the payload's crc32) last.
  PUT_RDMA / GET_RDMA  RESP info is "segment|address" of the kvstore's registered buffer; the
                     client moves the bytes with its Mooncake engine (one-sided write / read)
                     and answers DONE.
  RESERVE            Unix socket only (``reserve``): ReserveKv without a gRPC call, for a
                     prefill on the kvstore's host. The handle is zeros, ``nbytes`` the KV
                     size, ``block_bytes`` the lease in ms; the request id is followed by
                     u16 length + owner (the gateway id). RESP info is the base64 of a
                     ReserveKvResponse, or with status REFUSED "<code>|<reason>|<message>".
"""

from __future__ import annotations

import asyncio
import enum
import socket
import struct
from collections.abc import Callable

from services.kv.base import Status, TransferError

REQ = struct.Struct("<4sBBB16sHQQ")
RESP = struct.Struct("<BQH")
MAGIC = b"PDKT"
VERSION = 2
CHUNK = 4 << 20
# A request id on the wire (the gateway's internal ids are 32 hex characters); the u16
# length field could carry 65,535, but neither side needs or accepts more than this.
MAX_REQUEST_ID_BYTES = 1024

# REQ flags
FLAG_FALLBACK = 1  # this transfer is the tcp retry of a failed one (counted by the kvstore)
FLAG_RETRYABLE = 2  # a broken PUT should go back to RESERVED: the client will retry on tcp
DONE_RELEASED = 1  # GET_SHM DONE's nbytes: the client no longer maps the memfd


class Op(enum.IntEnum):
    PUT = 1
    GET = 2
    PUT_BLOCKS = 3
    GET_BLOCKS = 4
    PUT_SHM = 5
    GET_SHM = 6
    PUT_RDMA = 7
    GET_RDMA = 8
    PUT_LAYERS = 9
    RESERVE = 10


OP_TRANSPORT = {Op.PUT: "tcp", Op.GET: "tcp", Op.PUT_BLOCKS: "tcp", Op.GET_BLOCKS: "tcp",
                Op.PUT_SHM: "shm", Op.GET_SHM: "shm", Op.PUT_RDMA: "rdma", Op.GET_RDMA: "rdma",
                Op.PUT_LAYERS: "tcp", Op.RESERVE: "shm"}


def pack_req(op: Op, handle: str, request_id: str, nbytes: int = 0, block_bytes: int = 0,
             flags: int = 0) -> bytes:
    try:
        raw_handle = bytes.fromhex(handle)
    except ValueError:
        raw_handle = b""
    if len(raw_handle) != 16:
        raise TransferError(f"malformed KV handle {handle[:40]!r}", Status.NOT_FOUND)
    rid = request_id.encode()
    if not rid or len(rid) > MAX_REQUEST_ID_BYTES:
        raise TransferError(f"request id of {len(rid)} bytes: need 1 to {MAX_REQUEST_ID_BYTES}",
                            Status.PROTOCOL)
    return REQ.pack(MAGIC, VERSION, op, flags, raw_handle, len(rid), nbytes, block_bytes) + rid


def pack_resp(status: Status, nbytes: int = 0, info: str = "") -> bytes:
    raw = info.encode()[:4096]
    return RESP.pack(status, nbytes, len(raw)) + raw


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise TransferError(f"bad data address {address!r}, expected host:port")
    return host.strip("[]"), int(port)


async def recv_into(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                    view: memoryview, progress: Callable[[], None] | None = None) -> None:
    """Fill ``view``; ``progress`` is called after every read that moved bytes (the
    kvstore pushes its idle deadline back with it)."""
    got, n = 0, len(view)
    while got < n:
        r = await loop.sock_recv_into(sock, view[got : min(n, got + CHUNK)])
        if r == 0:
            raise TransferError(f"peer closed the data channel after {got} of {n} bytes")
        got += r
        if progress is not None:
            progress()


async def wait_readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Until ``sock`` has bytes (or EOF) to read, without reading them."""
    fut: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(sock.fileno(), readable)
    try:
        await fut
    finally:
        loop.remove_reader(sock.fileno())


async def recv_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    await recv_into(loop, sock, memoryview(buf))
    return bytes(buf)


async def read_resp(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                    what: str = "kvstore") -> tuple[int, str]:
    """One RESP; raises ``TransferError`` carrying the remote status unless it is OK."""
    status, nbytes, ilen = RESP.unpack(await recv_exact(loop, sock, RESP.size))
    info = (await recv_exact(loop, sock, ilen)).decode(errors="replace") if ilen else ""
    if status != Status.OK:
        raise TransferError(f"{what} refused the transfer: {info}", status)
    return nbytes, info


async def connect_tcp(address: str) -> socket.socket:
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
    raise TransferError(f"cannot connect to data channel {address}: {err}", Status.CONNECT)


async def connect_unix(path: str) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, path)
    except OSError as e:
        sock.close()
        raise TransferError(f"cannot connect to shm channel {path}: {e}", Status.CONNECT) from e
    return sock
