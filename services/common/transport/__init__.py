"""KV data-plane transports behind one interface (see ``base``), their negotiation and
fallback (``negotiate``), and the kvstore's data server (``server``).

Call sites use ``push_kv`` (prefill) and ``fetch_kv`` (decode: the fetched KV is held
until it is copied out, then released); ``pull_kv`` fetches a buffer the caller keeps.
``transfer_load`` is the process's data-plane counters for its registry load.
"""

from services.common.transport.base import KvLease, KvTransport, Status, TransferError
from services.common.transport.config import KvTransferConfig
from services.common.transport.negotiate import (
    STATS,
    KvFetch,
    TransferResult,
    client_for,
    fetch_kv,
    pull_kv,
    push_kv,
    transfer_load,
)
from services.common.transport.rdma import RdmaTransport
from services.common.transport.server import DataServer
from services.common.transport.shm import ShmTransport
from services.common.transport.tcp import TcpTransport

__all__ = ["STATS", "DataServer", "KvFetch", "KvLease", "KvTransferConfig", "KvTransport",
           "RdmaTransport", "ShmTransport", "Status", "TcpTransport", "TransferError",
           "TransferResult", "client_for", "fetch_kv", "pull_kv", "push_kv", "transfer_load"]
