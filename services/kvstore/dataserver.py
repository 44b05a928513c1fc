"""The kvstore's data server: one listener per transport, one lifecycle (the handler).

  tcp   a TCP socket: PUT/GET (and the block-fixed variants, and PUT_LAYERS: per-layer
        transfer) with the bytes inline, and the control exchange of PUT_RDMA/GET_RDMA
        (bytes through Mooncake);
  shm   a Unix socket in a private temp dir: PUT_SHM/GET_SHM pass the buffer's memfd.
        A GET_SHM's entry is CONSUMED once the decode has mapped it; the connection then
        stays open until the decode says it has copied the KV out (RELEASED), and only
        then does the memfd go back to the pool.

A connection carries transfers one after another (clients pool their connections,
``services.kv.connpool``): after one that completed OK it waits up to ``idle_s`` for the
next header; any failure or refusal closes it, so a connection in doubt never carries
another request. Every transfer is bounded by ``max_transfer_s``: a peer that stalls or
vanishes ends its transfer (and a push returns its bytes to the lifecycle) instead of
holding them. A connection must send its request header within ``idle_s`` and a push's
payload must keep moving (no ``idle_s`` without a byte); one peer address holds at most
``max_conns_per_peer`` connections at once (a new one past that evicts a connection idle
between transfers, else it is closed on accept), so idle sockets cannot pile up. Fault
injection (``faults``) happens here, on the server side of every transport.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import os
import shutil
import socket
import struct
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import numpy as np

from services.common.errors import PdserveError
from services.common.tasks import cancel_and_wait
from services.kv.base import Status, TransferError
from services.kv.layout import HEADER_BYTES, KvFormatError, decode_header
from services.kv.shm import send_fd
from services.kv.tcp import recv_blocks, send_blocks
from services.kv.wire import (
    DONE_RELEASED,
    FLAG_FALLBACK,
    FLAG_RETRYABLE,
    MAGIC,
    MAX_REQUEST_ID_BYTES,
    OP_TRANSPORT,
    REQ,
    RESP,
    VERSION,
    Op,
    pack_resp,
    read_resp,
    recv_exact,
    recv_into,
)
from services.kvstore.faults import Faults

log = logging.getLogger(__name__)


def _page_bytes(source: memoryview, tokens: int) -> int:
    """A GET_BLOCKS page: ``tokens`` tokens of one layer, sized from the staged header."""
    try:
        meta = decode_header(source)
        return max(1, meta.layer_nbytes // meta.num_tokens * tokens)
    except KvFormatError:  # not a KV buffer: fixed 64 KiB pages
        return 64 << 10


class Segmented(Protocol):
    fd: int
    shared: bool

    def close(self) -> None: ...


def _close(conn: socket.socket, _task: object = None) -> None:
    conn.close()


# (request_id, nbytes, lease_ms, owner) -> (ReserveKvResponse bytes, undo)
Reserver = Callable[[str, int, int, str], Awaitable[tuple[bytes, Callable[[], None]]]]


class DataHandler(Protocol):
    """What the server needs from the kvstore's lifecycle (``KvStore`` implements it)."""

    def begin_put(self, handle: str, request_id: str, nbytes: int,
                  takeover: bool = False) -> memoryview: ...

    def end_put(self, handle: str, ok: bool, generation: int = 0, keep: bool = False) -> None: ...

    def begin_get(self, handle: str, request_id: str) -> memoryview: ...

    def end_get(self, handle: str, ok: bool, lend: bool = False) -> Segmented | None: ...

    def give_back(self, segment: Any) -> None: ...  # a Segmented it lent out

    def segment_of(self, handle: str) -> Segmented | None: ...

    def generation_of(self, handle: str) -> int: ...


class DataServer:
    def __init__(self, handler: DataHandler, faults: Faults | None = None,
                 max_transfer_s: float = 60.0, idle_s: float = 10.0,
                 max_conns_per_peer: int = 64) -> None:
        self._handler = handler
        self.faults = faults or Faults()
        self.max_transfer_s = max_transfer_s
        self.idle_s = idle_s
        self.max_conns_per_peer = max_conns_per_peer
        self._per_peer: Counter[str] = Counter()
        self._listeners: list[tuple[socket.socket, asyncio.Task[None]]] = []
        self._conns: set[asyncio.Task[None]] = set()
        self._idle: dict[str, set[asyncio.Task[None]]] = {}  # peer -> between transfers
        self._evicted: set[asyncio.Task[None]] = set()
        self._pushes: dict[str, asyncio.Task[None]] = {}  # handle -> connection pushing it
        self._tmpdir = ""
        self.port = 0
        self.unix_path = ""
        self.rdma_engine: Any = None  # a rdma.MooncakeEngine when rdma is served
        # ReserveKv over the Unix socket (the kvstore's servicer sets it): the serialized
        # ReserveKvResponse and how to undo it, or a PdserveError.
        self.reserver: Reserver | None = None
        # "<transport>.<put|get>.<ok|failed|fallback>" -> count, for stats and the scheduler.
        self.counters: Counter[str] = Counter()

    async def start(self, host: str, port: int, shm: bool = False) -> int:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, type_, proto, _, addr = infos[0]
        sock = socket.socket(family, type_, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        self.port = sock.getsockname()[1]
        self._listen(sock, "tcp")
        if shm:
            self._tmpdir = tempfile.mkdtemp(prefix="pdserve-kv-")
            self.unix_path = os.path.join(self._tmpdir, "data.sock")
            usock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            usock.bind(self.unix_path)
            self._listen(usock, "shm")
        return self.port

    def _listen(self, sock: socket.socket, kind: str) -> None:
        sock.listen(256)
        sock.setblocking(False)
        task = asyncio.create_task(self._accept_loop(sock, kind), name=f"kv-data-accept-{kind}")
        self._listeners.append((sock, task))

    async def _accept_loop(self, lsock: socket.socket, kind: str) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, addr = await loop.sock_accept(lsock)
            conn.setblocking(False)
            peer = str(addr[0]) if kind == "tcp" else "unix"
            if self._per_peer[peer] >= self.max_conns_per_peer and not self._evict_idle(peer):
                self.counters["refused.per_peer_limit"] += 1
                conn.close()
                continue
            if kind == "tcp":
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._per_peer[peer] += 1
            task = asyncio.create_task(self._serve(conn, kind, peer))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)
            task.add_done_callback(functools.partial(self._left, peer))
            # Closed even when the task is cancelled before it first ran (close()).
            task.add_done_callback(functools.partial(_close, conn))

    def _left(self, peer: str, _task: object = None) -> None:
        self._per_peer[peer] -= 1
        if self._per_peer[peer] <= 0:
            del self._per_peer[peer]

    def _evict_idle(self, peer: str) -> bool:
        """At the per-peer limit, a connection kept open between transfers gives way to a
        new one (its client sees it closed and dials afresh)."""
        idle = self._idle.get(peer)
        if not idle:
            return False
        task = idle.pop()
        self._evicted.add(task)
        task.cancel()
        self.counters["evicted.idle"] += 1
        return True

    async def _serve(self, conn: socket.socket, kind: str, peer: str = "") -> None:
        """Serve transfers on ``conn`` one after another until the client closes it, one
        fails, or it sits idle for ``idle_s`` between two (a client's pool reuses it)."""
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        idle = self._idle.setdefault(peer, set())
        try:
            first = b""
            while True:
                if not await self._serve_one(loop, conn, kind, first):
                    return
                # Between transfers: idle, and evictable at the per-peer limit.
                if me is not None:
                    idle.add(me)
                try:
                    async with asyncio.timeout(self.idle_s):
                        first = await loop.sock_recv(conn, REQ.size)
                except TimeoutError:
                    return
                except asyncio.CancelledError:
                    if me is not None and me in self._evicted:
                        self._evicted.discard(me)
                        me.uncancel()
                        return
                    raise
                finally:
                    idle.discard(me)
                if not first:
                    return  # the client closed it between transfers: a clean end
        except (TransferError, OSError) as e:
            log.info("data channel transfer ended early: %s", e)
        finally:
            conn.close()

    async def _serve_one(self, loop: asyncio.AbstractEventLoop, conn: socket.socket,
                         kind: str, first: bytes) -> bool:
        """One transfer (``first``: header bytes already read); True when it completed OK
        and the connection may carry the next one."""
        try:
            async with asyncio.timeout(self.max_transfer_s) as bound:
                async with asyncio.timeout(self.idle_s):  # the header comes at once or never
                    raw = first + await recv_exact(loop, conn, REQ.size - len(first))
                magic, version, op, flags, handle_b, rid_len, nbytes, block = REQ.unpack(raw)
                if magic != MAGIC or version != VERSION or op not in Op._value2member_map_ \
                        or not 0 < rid_len <= MAX_REQUEST_ID_BYTES:
                    await loop.sock_sendall(conn, pack_resp(Status.PROTOCOL, 0,
                                                            "bad request header or version"))
                    return False
                op = Op(op)
                transport = OP_TRANSPORT[op]
                if (transport == "shm") != (kind == "shm") or (
                        transport == "rdma" and self.rdma_engine is None):
                    await loop.sock_sendall(conn, pack_resp(
                        Status.UNSUPPORTED, 0, f"{op.name} is not served on this {kind} socket"))
                    return False
                if op is Op.RESERVE:
                    return await self._reserve(loop, conn, rid_len, nbytes, block)
                if transport in ("shm", "rdma") and self.faults.take(f"refuse_{transport}",
                                                                     transport):
                    return False  # injected: the fast path dies before any byte moves
                async with asyncio.timeout(self.idle_s):
                    request_id = (await recv_exact(loop, conn, rid_len)).decode(
                        errors="replace")
                handle = handle_b.hex()
                put = op in (Op.PUT, Op.PUT_BLOCKS, Op.PUT_SHM, Op.PUT_RDMA, Op.PUT_LAYERS)
                lent: Segmented | None = None
                key = f"{transport}.{'put' if put else 'get'}"
                if flags & FLAG_FALLBACK:
                    self.counters[f"{key}.fallback"] += 1
                if op is Op.PUT_LAYERS:
                    self.counters[f"{key}.layered"] += 1
                try:
                    if put:
                        ok = await self._put(loop, conn, op, transport, handle, request_id,
                                             nbytes, block, flags, bound)
                    else:
                        ok, lent = await self._get(loop, conn, op, transport, handle,
                                                   request_id, block)
                except BaseException:
                    self.counters[f"{key}.failed"] += 1
                    raise
                self.counters[f"{key}.ok"] += 1
                if lent is not None:
                    ok = await self._until_released(loop, conn, lent)
                return ok
        except TimeoutError as e:
            log.info("data channel transfer ended early: %s", e or "timed out")
            return False

    # -- reserve (ReserveKv on the Unix socket) ----------------------------------------------
    async def _reserve(self, loop: asyncio.AbstractEventLoop, conn: socket.socket,
                       rid_len: int, nbytes: int, lease_ms: int) -> bool:
        async with asyncio.timeout(self.idle_s):
            request_id = (await recv_exact(loop, conn, rid_len)).decode(errors="replace")
            (olen,) = struct.unpack("<H", await recv_exact(loop, conn, 2))
            owner = (await recv_exact(loop, conn, olen)).decode(errors="replace")
        if self.reserver is None:
            await loop.sock_sendall(conn, pack_resp(Status.UNSUPPORTED, 0,
                                                    "RESERVE is not served here"))
            return False
        try:
            answer, undo = await self.reserver(request_id, nbytes, lease_ms, owner)
        except PdserveError as e:
            self.counters["reserve.refused"] += 1
            await loop.sock_sendall(conn, pack_resp(
                Status.REFUSED, 0, f"{e.code.name}|{e.reason}|{e.message}"))
            return True  # answered in full: the connection is clean
        except BaseException:
            self.counters["reserve.failed"] += 1
            raise
        try:
            await loop.sock_sendall(conn, pack_resp(Status.OK, nbytes,
                                                    base64.b64encode(answer).decode()))
        except BaseException:
            undo()  # the caller never got the handle: nobody else could release it
            raise
        self.counters["reserve.ok"] += 1
        return True

    # -- push ---------------------------------------------------------------------------------
    async def _put(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, op: Op,
                   transport: str, handle: str, request_id: str, nbytes: int, block: int,
                   flags: int, bound: asyncio.Timeout) -> bool:
        """True when the push completed and was confirmed (OK)."""
        if op is Op.PUT_LAYERS and (block <= 0 or nbytes <= HEADER_BYTES
                                    or (nbytes - HEADER_BYTES) % block):
            await loop.sock_sendall(conn, pack_resp(
                Status.PROTOCOL, 0, f"{nbytes} bytes are not whole layers of {block}"))
            return False
        try:
            target = self._handler.begin_put(handle, request_id, nbytes, takeover=True)
        except TransferError as e:
            await loop.sock_sendall(conn, pack_resp(Status(max(e.status, 1)), 0, str(e)))
            return False
        generation = self._handler.generation_of(handle)
        me = asyncio.current_task()
        old = self._pushes.get(handle)
        if old is not None and old is not me:
            old.cancel()  # a retry took over: the old connection must stop writing
        if me is not None:
            self._pushes[handle] = me
        ok = False
        try:
            if op is Op.PUT_SHM:
                await self._serve_shm(loop, conn, handle, nbytes, "put", transport)
            elif op is Op.PUT_RDMA:
                await self._serve_rdma(loop, conn, target, "put", transport)
            else:
                await loop.sock_sendall(conn, pack_resp(Status.OK, nbytes))
                layered = bound if op is Op.PUT_LAYERS else None
                await self._recv_payload(loop, conn, target, block, transport, layered)
            ok = True
        finally:
            if self._pushes.get(handle) is me:
                del self._pushes[handle]
            try:
                self._handler.end_put(handle, ok, generation, keep=bool(flags & FLAG_RETRYABLE))
            except TransferError as e:
                ok = False
                with contextlib.suppress(OSError):
                    await loop.sock_sendall(conn, pack_resp(Status(max(e.status, 1)), 0, str(e)))
        if ok:
            await loop.sock_sendall(conn, pack_resp(Status.OK, nbytes))
        return ok

    async def _recv_payload(self, loop: asyncio.AbstractEventLoop, conn: socket.socket,
                            target: memoryview, block: int, transport: str,
                            layered: asyncio.Timeout | None = None) -> None:
        """``layered``: a PUT_LAYERS, whose payload comes layer by layer as prefill computes
        (each layer gets a fresh transfer bound) and whose header comes last."""
        half = len(target) // 2
        if self.faults.take("drop_put", transport):
            await recv_into(loop, conn, target[:half])
            raise TransferError("injected fault: connection dropped mid-push", Status.BROKEN)
        if self.faults.take("stall_put", transport):
            await recv_into(loop, conn, target[:half])
            await self._until_closed(loop, conn)
        if layered is not None:
            for off in range(HEADER_BYTES, len(target), block):
                await recv_into(loop, conn, target[off : off + block])
                layered.reschedule(loop.time() + self.max_transfer_s)
            await recv_into(loop, conn, target[:HEADER_BYTES])
        elif block:
            await recv_blocks(loop, conn, target, block)
        else:
            # Idle bound: a push whose bytes stop coming for idle_s ends now, not at the
            # transfer bound, and its reservation goes back to the lifecycle.
            async with asyncio.timeout(self.idle_s) as idle:
                await recv_into(loop, conn, target,
                                lambda: idle.reschedule(loop.time() + self.idle_s))

    # -- fetch --------------------------------------------------------------------------------
    async def _get(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, op: Op,
                   transport: str, handle: str, request_id: str,
                   block: int) -> tuple[bool, Segmented | None]:
        """Serve one fetch; returns whether it was served, and the memfd segment a shm
        consumer still maps (its entry is CONSUMED; the caller waits for the release)."""
        try:
            source = self._handler.begin_get(handle, request_id)
        except TransferError as e:
            await loop.sock_sendall(conn, pack_resp(Status(max(e.status, 1)), 0, str(e)))
            return False, None
        ok = False
        lent: Segmented | None = None
        try:
            self._maybe_corrupt(source, transport)
            if op is Op.GET_SHM:
                await self._serve_shm(loop, conn, handle, len(source), "get", transport)
            elif op is Op.GET_RDMA:
                await self._serve_rdma(loop, conn, source, "get", transport)
            else:
                page = _page_bytes(source, block) if block else 0
                await loop.sock_sendall(conn, pack_resp(Status.OK, len(source),
                                                        str(page) if page else ""))
                half = len(source) // 2
                if self.faults.take("drop_get", transport):
                    await loop.sock_sendall(conn, source[:half])
                    raise TransferError("injected fault: connection dropped mid-fetch")
                if self.faults.take("stall_get", transport):
                    await loop.sock_sendall(conn, source[:half])
                    await self._until_closed(loop, conn)
                if page:
                    await send_blocks(loop, conn, source, page)
                else:
                    await loop.sock_sendall(conn, source)
            ok = True
        finally:
            lent = self._handler.end_get(handle, ok, lend=op is Op.GET_SHM)
        try:
            if op in (Op.GET_SHM, Op.GET_RDMA):
                await loop.sock_sendall(conn, pack_resp(Status.OK, len(source)))
        except BaseException as e:
            if lent is not None:
                self._handler.give_back(lent)  # the consumer is gone: shared, so closed
            if isinstance(e, OSError):
                return False, None
            raise
        return True, lent

    async def _until_released(self, loop: asyncio.AbstractEventLoop, conn: socket.socket,
                              seg: Segmented) -> bool:
        """A shm consumer maps the segment until its restore has copied the KV out; then it
        says RELEASED and the pool may reuse the pages. Anything else (the decode was
        cancelled or died, the transfer bound ran out) leaves the segment shared: it is
        closed, never reused under a reader that may still be live. True when the
        exchange completed (the connection may carry another transfer)."""
        answered = False
        try:
            released, _ = await read_resp(loop, conn, "client")
            answered = True
            if released == DONE_RELEASED:
                seg.shared = False
        except (TransferError, OSError) as e:
            log.info("shm consumer ended without releasing its mapping: %s", e)
        finally:
            # Counted either way: "released" went back to the pool, "unreleased" was closed.
            self.counters["shm.get.released" if not seg.shared else "shm.get.unreleased"] += 1
            self._handler.give_back(seg)
        try:
            await loop.sock_sendall(conn, pack_resp(Status.OK))
        except OSError:
            return False
        return answered

    def _maybe_corrupt(self, source: memoryview, transport: str) -> None:
        if self.faults.take("corrupt_header", transport):
            arr = np.frombuffer(source, dtype=np.uint8)
            arr[min(40, len(arr) - 1)] ^= 0xFF  # inside the header's JSON: crc mismatch
        if self.faults.take("corrupt_payload", transport) and len(source) > HEADER_BYTES:
            arr = np.frombuffer(source, dtype=np.uint8)
            arr[HEADER_BYTES + (len(arr) - HEADER_BYTES) // 2] ^= 0xFF

    async def _maybe_stall_or_drop(self, loop: asyncio.AbstractEventLoop, conn: socket.socket,
                                   direction: str, transport: str) -> None:
        if self.faults.take(f"drop_{direction}", transport):
            raise TransferError(f"injected fault: connection dropped mid-{direction}")
        if self.faults.take(f"stall_{direction}", transport):
            await self._until_closed(loop, conn)

    @staticmethod
    async def _until_closed(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        """Injected stall: answer nothing until the peer gives up and closes."""
        while await loop.sock_recv(conn, 1 << 16):
            pass
        raise TransferError("injected fault: stalled until the peer closed the connection")

    async def _serve_shm(self, loop: asyncio.AbstractEventLoop, conn: socket.socket,
                         handle: str, nbytes: int, direction: str, transport: str) -> None:
        """Hand the buffer's memfd over; the client writes (put) or maps (get) it, then
        answers DONE."""
        seg = self._handler.segment_of(handle)
        if seg is None or seg.fd < 0:
            raise TransferError("the staged buffer is not shared memory", Status.UNSUPPORTED)
        seg.shared = True  # another process may map these pages from now on
        await send_fd(loop, conn, RESP.pack(Status.OK, nbytes, 0), seg.fd)
        await self._maybe_stall_or_drop(loop, conn, direction, transport)
        await read_resp(loop, conn, "client")  # DONE: written (put) or mapped (get)
        if direction == "put":
            # The producer wrote before DONE and writes again only when these pages are
            # handed to it again (it may keep them mapped): they are ours again.
            seg.shared = False

    async def _serve_rdma(self, loop: asyncio.AbstractEventLoop, conn: socket.socket,
                          buf: memoryview, direction: str, transport: str) -> None:
        engine = self.rdma_engine
        assert engine is not None
        arr = np.frombuffer(buf, dtype=np.uint8)
        addr = int(arr.ctypes.data)
        engine.register(addr, len(arr))
        try:
            await loop.sock_sendall(conn, pack_resp(Status.OK, len(arr),
                                                    f"{engine.session}|{addr}"))
            await self._maybe_stall_or_drop(loop, conn, direction, transport)
            await read_resp(loop, conn, "client")  # DONE: the one-sided transfer finished
        finally:
            # Unregister before the buffer can be freed; ``arr`` keeps it alive until here.
            engine.unregister(addr)
            del arr

    def transfer_load(self) -> dict[str, float]:
        return {f"kv.{k}": float(v) for k, v in self.counters.items()}

    async def close(self) -> None:
        for sock, task in self._listeners:
            await cancel_and_wait(task)
            sock.close()
        for t in list(self._conns):
            t.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
