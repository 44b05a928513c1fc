"""The transport interface.

A transport moves one request's contiguous KV buffer between a client (prefill
pushing, decode pulling) and the kvstore's data server, after one metadata
exchange. The server side delegates buffer ownership to a ``KvDataHandler``
(the kvstore's lifecycle), so a transport never decides when bytes are freed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol


class TransferError(Exception):
    """A transfer failed: connection, protocol or remote refusal. ``status`` is the
    remote status code when the server answered (see ``tcp.Status``)."""

    def __init__(self, message: str, status: int = -1) -> None:
        super().__init__(message)
        self.status = status


class KvTransport(ABC):
    """Client side of a data channel."""

    name: str

    @abstractmethod
    async def put(self, address: str, handle: str, request_id: str, data: memoryview) -> None:
        """Push ``data`` into the reservation ``handle`` at ``address``."""

    @abstractmethod
    async def get(self, address: str, handle: str, request_id: str) -> memoryview:
        """Fetch the staged buffer of ``handle`` (single consumer)."""


class KvDataHandler(Protocol):
    """Server-side hooks the kvstore implements. Each raises ``TransferError``
    with a status code to refuse."""

    def begin_put(self, handle: str, request_id: str, nbytes: int) -> memoryview: ...

    def end_put(self, handle: str, ok: bool) -> None: ...

    def begin_get(self, handle: str, request_id: str) -> memoryview: ...

    def end_get(self, handle: str, ok: bool) -> None: ...
