"""``rdma``: KV moved by the Mooncake Transfer Engine (``mooncake-transfer-engine-non-cuda``).

Why Mooncake and not NIXL: on this platform (CPU, Debian 12) the non-CUDA Mooncake wheel is
255 MB and needs only Debian's ``libibverbs1``; its ``P2PHANDSHAKE`` mode needs no etcd or
metadata server. NIXL pulls ~1.5 GB of CUDA-built libraries and its bundled libnl crashes at
exit next to Debian's ibverbs providers (see docs/data-plane.md).

The kvstore registers each staged buffer with its engine and tells the client where it is
(segment + address) on the data channel; the client's engine then moves the bytes
one-sided (write for a push, read for a fetch), as RDMA does, and confirms with DONE.

Honesty about the wire: we look for RDMA devices ourselves (``/sys/class/infiniband``).
With devices, the engine is started with protocol ``rdma``. Without, Mooncake would log
"No RDMA devices found" and silently use its TCP transport; we start it with protocol
``tcp`` explicitly and report ``rdma/tcp`` as the path, and a process only offers it when
``kv_rdma_tcp_mode`` is set (our own tcp is faster than Mooncake's TCP transport here).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from functools import cache

import numpy as np

from services.kv.base import KvTransport, Status, TransferError
from services.kv.layout import byte_view
from services.kv.wire import Op, connect_tcp, pack_req, pack_resp, read_resp

log = logging.getLogger(__name__)
IB_SYSFS = "/sys/class/infiniband"


def rdma_devices(sysfs: str = IB_SYSFS) -> list[str]:
    """RDMA devices the kernel exposes (empty when there are none, as on this machine)."""
    try:
        return sorted(os.listdir(sysfs))
    except OSError:
        return []


@cache
def mooncake_importable() -> bool:
    try:
        from mooncake.engine import TransferEngine  # noqa: F401
    except ImportError as e:
        log.info("rdma transport unavailable: cannot import Mooncake (%s); install the "
                 "'rdma' extra and Debian libibverbs1 (scripts/bootstrap.sh)", e)
        return False
    return True


def wire_protocol() -> str:
    return "rdma" if rdma_devices() else "tcp"


class MooncakeEngine:
    """One Mooncake TransferEngine per process, started on the protocol we detected."""

    def __init__(self, host: str) -> None:
        from mooncake.engine import TransferEngine

        self.protocol = wire_protocol()
        self.te = TransferEngine()
        rc = self.te.initialize(host, "P2PHANDSHAKE", self.protocol, "")
        if rc != 0:
            raise TransferError(f"Mooncake engine failed to start on {host} ({self.protocol}): "
                                f"rc={rc}", Status.CONNECT)
        self.session = f"{host}:{self.te.get_rpc_port()}"
        log.info("Mooncake transfer engine at %s, protocol %s (RDMA devices: %s)",
                 self.session, self.protocol, ", ".join(rdma_devices()) or "none")

    def register(self, addr: int, nbytes: int) -> None:
        if self.te.register_memory(addr, nbytes) != 0:
            raise TransferError("Mooncake could not register the KV buffer", Status.IO_ERROR)

    def unregister(self, addr: int) -> None:
        self.te.unregister_memory(addr)

    async def move(self, write: bool, peer: str, local: np.ndarray, remote: int) -> None:
        """Register ``local``, run one blocking transfer on a thread (Mooncake releases the
        GIL), unregister. If the caller is cancelled the thread still finishes; ``local``
        and its registration live until it has."""
        addr, nbytes = int(local.ctypes.data), int(local.nbytes)
        self.register(addr, nbytes)
        fn = self.te.transfer_sync_write if write else self.te.transfer_sync_read
        fut = asyncio.get_running_loop().run_in_executor(None, fn, peer, addr, remote, nbytes)
        try:
            rc = await asyncio.shield(fut)
        except asyncio.CancelledError:
            def unregister_later(_f: asyncio.Future[int], keep: np.ndarray = local) -> None:
                self.unregister(int(keep.ctypes.data))  # once the engine is done with it

            fut.add_done_callback(unregister_later)
            raise
        self.unregister(addr)
        if rc != 0:
            raise TransferError(f"Mooncake {'write' if write else 'read'} of {nbytes} bytes "
                                f"to {peer} failed (rc={rc})", Status.BROKEN)


_engines: dict[str, MooncakeEngine] = {}
_engine_lock = threading.Lock()


def engine_for(host: str) -> MooncakeEngine:
    with _engine_lock:
        if host not in _engines:
            _engines[host] = MooncakeEngine(host)
        return _engines[host]


class RdmaTransport(KvTransport):
    """Client: control on the kvstore's TCP data channel, bytes through Mooncake."""

    name = "rdma"

    @property
    def label(self) -> str:
        return f"rdma/{wire_protocol()}"

    @staticmethod
    def _engine(address: str) -> MooncakeEngine:
        host = address.rpartition(":")[0].strip("[]")
        return engine_for("127.0.0.1" if host in ("127.0.0.1", "localhost", "::1") else
                          _primary_ip())

    async def put(self, address: str, handle: str, request_id: str, data: memoryview,
                  flags: int = 0, block_bytes: int = 0) -> None:
        loop = asyncio.get_running_loop()
        engine = self._engine(address)
        sock = await connect_tcp(address)
        try:
            await loop.sock_sendall(sock, pack_req(Op.PUT_RDMA, handle, request_id, len(data),
                                                   0, flags))
            _, info = await read_resp(loop, sock)
            segment, _, remote = info.rpartition("|")
            try:
                await engine.move(True, segment, np.frombuffer(data, dtype=np.uint8),
                                  int(remote))
            except TransferError:
                with contextlib.suppress(OSError):
                    await loop.sock_sendall(sock, pack_resp(Status.IO_ERROR))
                raise
            await loop.sock_sendall(sock, pack_resp(Status.OK))
            await read_resp(loop, sock)
        except OSError as e:
            raise TransferError(f"KV push to {address} over rdma failed: {e}") from e
        finally:
            sock.close()

    async def get(self, address: str, handle: str, request_id: str, flags: int = 0,
                  block_bytes: int = 0) -> memoryview:
        loop = asyncio.get_running_loop()
        engine = self._engine(address)
        sock = await connect_tcp(address)
        try:
            await loop.sock_sendall(sock, pack_req(Op.GET_RDMA, handle, request_id, 0, 0, flags))
            nbytes, info = await read_resp(loop, sock)
            segment, _, remote = info.rpartition("|")
            buf = np.empty(nbytes, dtype=np.uint8)
            await engine.move(False, segment, buf, int(remote))
            await loop.sock_sendall(sock, pack_resp(Status.OK))
            return byte_view(buf)
        except OSError as e:
            raise TransferError(f"KV fetch from {address} over rdma failed: {e}") from e
        finally:
            sock.close()


def _primary_ip() -> str:
    from services.common.config import _primary_ip as ip

    return ip()
