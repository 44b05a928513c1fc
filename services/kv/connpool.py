"""Persistent data-channel connections: a client keeps the sockets of transfers that
ended cleanly and sends its next request header on one of them.

Before this, every push and every fetch dialled the kvstore's data server, which
accepted, spawned a task and closed per transfer: at c = 8 that was two connections per
request. The kvstore serves any number of transfers on one connection, one after
another (``services.kvstore.dataserver``), so a connection whose last exchange finished
OK is protocol-clean and can carry the next request.

Rules that keep it safe:
  - A socket goes back to the pool only after its transfer's last exchange completed OK
    (``give_back``). Any error, cancel or timeout closes it instead: a broken or
    half-read connection is never reused, so no request ever reads another's bytes.
  - A pooled socket is checked before reuse: readable means the kvstore closed it
    (restart, idle timeout, eviction) or sent bytes nobody asked for; it is dropped.
  - ``open_exchange``: if a reused socket still fails before the kvstore answered a
    single byte (it closed at the same moment), the request is sent once more on a new
    connection. The kvstore never acts on a header it did not answer, so that is safe.
  - Sockets idle longer than ``max_idle_s`` are dropped (the kvstore closes its side
    after its own ``data_idle_s``), at most ``max_idle`` are kept per address, and a
    socket is only reused on the event loop that created it.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from services.kv.base import TransferError
from services.kv.wire import connect_tcp, connect_unix, wait_readable

T = TypeVar("T")
MAX_IDLE_PER_ADDRESS = 16
MAX_IDLE_S = 5.0  # below the kvstore's default data_idle_s (10 s)


class ConnPool:
    def __init__(self, max_idle: int = MAX_IDLE_PER_ADDRESS,
                 max_idle_s: float = MAX_IDLE_S) -> None:
        self.max_idle = max_idle
        self.max_idle_s = max_idle_s
        # (kind, address) -> idle sockets, most recently used last, with their loop
        self._idle: dict[tuple[str, str], list[tuple[socket.socket, float,
                                                     asyncio.AbstractEventLoop]]] = {}
        self.dialled = 0
        self.reused = 0
        self.dropped = 0  # pooled sockets found dead or stale at checkout
        self.redialled = 0

    async def checkout(self, kind: str, address: str) -> tuple[socket.socket, bool]:
        """A socket to ``address`` (``kind`` "tcp" or "unix"); True when it was pooled."""
        loop = asyncio.get_running_loop()
        idle = self._idle.get((kind, address))
        now = time.monotonic()
        while idle:
            sock, since, owner = idle.pop()
            if owner is loop and now - since < self.max_idle_s and _alive(sock):
                self.reused += 1
                return sock, True
            self.dropped += 1
            sock.close()
        return await self.dial(kind, address), False

    async def dial(self, kind: str, address: str) -> socket.socket:
        self.dialled += 1
        return await (connect_unix(address) if kind == "unix" else connect_tcp(address))

    def give_back(self, kind: str, address: str, sock: socket.socket) -> None:
        """Pool a socket whose last exchange completed OK (never one in doubt)."""
        if sock.fileno() < 0:
            return
        idle = self._idle.setdefault((kind, address), [])
        idle.append((sock, time.monotonic(), asyncio.get_running_loop()))
        while len(idle) > self.max_idle:
            idle.pop(0)[0].close()

    async def open_exchange(self, kind: str, address: str, request: bytes,
                            answer: Callable[[socket.socket], Awaitable[T]],
                            ) -> tuple[socket.socket, T]:
        """Send ``request`` and read its first answer with ``answer``. A pooled socket
        that fails before any byte of the answer arrived is closed and the request is
        sent once more on a new connection. On any failure the socket is closed."""
        loop = asyncio.get_running_loop()
        sock, reused = await self.checkout(kind, address)
        while True:
            try:
                await loop.sock_sendall(sock, request)
                if reused and not await _answered(loop, sock):
                    raise ConnectionResetError("the pooled data connection was closed")
            except OSError as e:
                sock.close()
                if not reused:
                    raise TransferError(f"data channel {address} failed: {e}") from e
                self.redialled += 1
                sock, reused = await self.dial(kind, address), False
                continue
            try:
                return sock, await answer(sock)
            except BaseException:
                sock.close()
                raise

    def clear(self) -> None:
        for idle in self._idle.values():
            for sock, _, _ in idle:
                sock.close()
        self._idle.clear()


def _alive(sock: socket.socket) -> bool:
    """An idle pooled socket is healthy when nothing is readable on it: EOF (the peer
    closed or restarted) or stray bytes both mean it must not carry a request."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        pass
    return False


async def _answered(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bool:
    """Wait until the peer answers on ``sock``; False if it closed without a byte."""
    await wait_readable(loop, sock)
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return True  # spurious wake-up: the answer will come
    except OSError:
        return False


POOL = ConnPool()

__all__ = ["POOL", "ConnPool"]
