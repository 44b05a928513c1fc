"""KV data-plane transports behind one interface (see ``base``), their negotiation and
fallback (``negotiate``), and the wire format (``wire``, ``layout``). Prefill, decode and
the kvstore share this library; the kvstore's own data server is ``services.kvstore.dataserver``.

Call sites use ``push_kv`` (prefill) and ``fetch_kv`` (decode: the fetched KV is held
until it is copied out, then released); ``pull_kv`` fetches a buffer the caller keeps.
``transfer_load`` is the process's data-plane counters for its registry load.
"""

from services.kv.base import KvLease, KvTransport, Status, TransferError
from services.kv.config import KvTransferConfig
from services.kv.negotiate import (
    STATS,
    KvFetch,
    TransferResult,
    client_for,
    fetch_kv,
    pull_kv,
    push_kv,
    transfer_load,
)
from services.kv.rdma import RdmaTransport
from services.kv.shm import ShmTransport
from services.kv.tcp import TcpTransport

__all__ = ["STATS", "KvFetch", "KvLease", "KvTransferConfig", "KvTransport",
           "RdmaTransport", "ShmTransport", "Status", "TcpTransport", "TransferError",
           "TransferResult", "client_for", "fetch_kv", "pull_kv", "push_kv", "transfer_load"]
