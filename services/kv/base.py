"""The transport interface.

A transport moves one request's contiguous KV buffer between a client (prefill
pushing, decode pulling) and the kvstore's data server, after one metadata
exchange. The server side (``server.DataServer``) delegates buffer ownership to a
``DataHandler`` (the kvstore's lifecycle), so a transport never decides when bytes are
freed.

A fetch can also hold the staged buffer until the caller has copied it out
(``open_get`` -> ``KvLease``): shm uses that to let the kvstore reuse the pages only
once the decode no longer reads them.
"""

from __future__ import annotations

import asyncio
import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Protocol


class Reservation(Protocol):
    """Where a reserved KV buffer is staged (the kvstore's ``ReserveKvResponse``): the
    handle the data channel names it by and the endpoints that can move its bytes."""

    @property
    def handle(self) -> str: ...

    @property
    def data_address(self) -> str: ...

    @property
    def endpoints(self) -> Sequence[Any]: ...


class Status(enum.IntEnum):
    """Data-channel status codes. Values below 64 go on the wire; the rest are local."""

    OK = 0
    NOT_FOUND = 1
    BAD_STATE = 2
    SIZE_MISMATCH = 3
    PROTOCOL = 4
    IO_ERROR = 5
    UNSUPPORTED = 6  # the server cannot serve this op (e.g. shm for a heap buffer)
    CORRUPT = 7
    REFUSED = 8  # a RESERVE the kvstore refused: info is "<grpc code>|<reason>|<message>"
    CONNECT = 64  # local: could not reach the peer at all
    BROKEN = 65  # local: the connection or the library failed mid-way


# Refusals about the KV itself: retrying on another path cannot help.
FINAL_STATUSES = frozenset({Status.NOT_FOUND, Status.BAD_STATE, Status.SIZE_MISMATCH,
                            Status.REFUSED})


class TransferError(Exception):
    """A transfer failed: connection, protocol or remote refusal. ``status`` is the
    remote status code when the server answered, else a local one (``Status``)."""

    def __init__(self, message: str, status: int = Status.BROKEN) -> None:
        super().__init__(message)
        self.status = status

    @property
    def retryable(self) -> bool:
        """True when another path (tcp) may still succeed: connect failures, broken
        connections, unsupported ops. False for refusals about the KV handle itself."""
        return self.status not in FINAL_STATUSES


RELEASE_TRIES = 25  # x 2 ms: how long a release waits for the last view to go


class KvLease:
    """A fetched KV buffer the caller reads in place. ``release`` once it is copied out
    (the kvstore may then reuse the memory); ``abort`` when that is in doubt (cancelled
    while a thread may still read it): the memory is then never reused.

    Transports that copy into a private buffer (tcp, rdma) return a lease whose release
    and abort do nothing."""

    def __init__(self, view: memoryview) -> None:
        self.view = view

    async def release(self, timeout_s: float = 5.0) -> None:
        return None

    def abort(self) -> None:
        return None

    async def _drop_view(self, close: Callable[[], bool]) -> bool:
        """Release ``view``, then ``close`` the memory under it (it raises BufferError, or
        returns False, while another view of that memory is alive). Retried for up to
        ~50 ms: an executor thread sets its future's result before it drops the call's
        arguments. True once closed; False means something may still read it."""
        for _ in range(RELEASE_TRIES):
            try:
                self.view.release()
                if close():
                    return True
            except BufferError:
                pass
            await asyncio.sleep(0.002)
        return False


class KvTransport(ABC):
    """Client side of a data channel. ``address`` is the endpoint's address for this
    transport (host:port for tcp and rdma's control, a Unix socket path for shm)."""

    name: str

    @property
    def label(self) -> str:
        """What actually carried the bytes, as reported in timings and spans."""
        return self.name

    @abstractmethod
    async def put(self, address: str, handle: str, request_id: str, data: memoryview,
                  flags: int = 0, block_bytes: int = 0) -> None:
        """Push ``data`` into the reservation ``handle`` at ``address``. ``block_bytes`` > 0
        selects block-fixed mode (transports that cannot do it ignore it)."""

    @abstractmethod
    async def get(self, address: str, handle: str, request_id: str, flags: int = 0,
                  block_bytes: int = 0) -> memoryview:
        """Fetch the staged buffer of ``handle`` (single consumer)."""

    async def open_get(self, address: str, handle: str, request_id: str, flags: int = 0,
                       block_bytes: int = 0) -> KvLease:
        """Fetch and hold: the lease says when the staged memory may be reused."""
        return KvLease(await self.get(address, handle, request_id, flags, block_bytes))
