"""KV data-channel transports behind one interface (see ``base``)."""

from services.common.transport.base import KvDataHandler, KvTransport, TransferError
from services.common.transport.tcp import TcpDataServer, TcpTransport

__all__ = ["KvDataHandler", "KvTransport", "TcpDataServer", "TcpTransport", "TransferError"]


def get_transport(name: str) -> KvTransport:
    if name == "tcp":
        return TcpTransport()
    raise ValueError(f"unknown KV transport {name!r}; available: tcp")
