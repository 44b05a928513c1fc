"""Persistent data-channel connections (services/kv/connpool.py) against a real in-process
data server: reuse, a restarted or closing server, failures never pooled, no bytes mixed
between requests, eviction of idle connections at the per-peer limit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest

from pdserve.v1 import common_pb2
from services.common.runtime import host_id
from services.kv import KvTransferConfig, fetch_kv, push_kv
from services.kv.connpool import POOL, ConnPool
from services.kv.layout import HEADER_BYTES
from services.kvstore.dataserver import DataServer
from services.kvstore.faults import Faults
from services.kvstore.memory import memfd_segment
from services.kvstore.store import KvStore

pytestmark = pytest.mark.unit
TOKENS = 16


class Res:
    def __init__(self, handle: str, eps: list[common_pb2.KvEndpoint]) -> None:
        self.handle, self.endpoints, self.data_address = handle, eps, eps[-1].address


class Node:
    def __init__(self, idle_s: float = 10.0, max_conns: int = 64) -> None:
        self.store = KvStore(1 << 30, 30.0, allocate=memfd_segment)
        self.server = DataServer(self.store, max_transfer_s=5.0, idle_s=idle_s,
                                 max_conns_per_peer=max_conns)
        self.eps: list[common_pb2.KvEndpoint] = []

    async def start(self) -> Node:
        port = await self.server.start("127.0.0.1", 0, shm=True)
        self.eps = [common_pb2.KvEndpoint(transport="shm", address=self.server.unix_path,
                                          protocol="memfd", host_id=host_id()),
                    common_pb2.KvEndpoint(transport="tcp", address=f"127.0.0.1:{port}",
                                          protocol="tcp")]
        return self

    async def roundtrip(self, cfg: KvTransferConfig, rid: str, seed: int) -> tuple[bytes, bytes]:
        data = np.random.default_rng(seed).integers(0, 255, HEADER_BYTES + TOKENS * 512,
                                                    dtype=np.uint8)
        e = self.store.reserve(rid, data.nbytes)
        pushed = await push_kv(cfg, Res(e.handle, self.eps), rid, memoryview(data), TOKENS)
        kv = common_pb2.KvRef(handle=e.handle, data_address=self.eps[-1].address,
                              endpoints=self.eps, nbytes=data.nbytes, num_tokens=TOKENS)
        async with await fetch_kv(cfg, kv, rid) as f:
            got = bytes(f.view)
        assert not pushed.fallback and not f.result.fallback
        return got, data.tobytes()


@pytest.fixture()
async def node() -> AsyncIterator[Node]:
    POOL.clear()
    n = await Node().start()
    yield n
    POOL.clear()
    await n.server.close()
    assert n.store.bytes_held == 0, "KV bytes leaked"


async def _until(cond: object, what: str) -> None:
    for _ in range(200):
        if cond():  # type: ignore[operator]
            return
        await asyncio.sleep(0.01)
    raise AssertionError(what)


@pytest.mark.parametrize("transports", ["shm,tcp", "tcp"])
async def test_transfers_reuse_connections_and_never_mix_bytes(node: Node,
                                                               transports: str) -> None:
    cfg = KvTransferConfig(kv_transports=transports)
    dialled = POOL.dialled
    for i in range(6):  # one after another: one push and one fetch connection at most
        got, want = await node.roundtrip(cfg, f"seq{i}", i)
        assert got == want
    assert POOL.dialled - dialled <= 2 and POOL.reused >= 10
    # Concurrent requests on pooled connections: each gets its own bytes back.
    results = await asyncio.gather(*(node.roundtrip(cfg, f"par{i}", 100 + i)
                                     for i in range(8)))
    assert all(got == want for got, want in results)
    kind = transports.split(",")[0]
    await _until(lambda: node.server.counters[f"{kind}.get.ok"] == 14, "every fetch served")
    assert node.server.counters[f"{kind}.put.ok"] == 14


async def test_a_restarted_server_is_redialled_not_reused_broken(node: Node) -> None:
    cfg = KvTransferConfig(kv_transports="tcp")
    await node.roundtrip(cfg, "before", 1)
    assert POOL._idle  # the connections are pooled
    # The server's side of every idle connection goes away (as in a restart).
    for task in list(node.server._conns):
        task.cancel()
    await asyncio.sleep(0.05)
    dropped, dialled = POOL.dropped, POOL.dialled
    got, want = await node.roundtrip(cfg, "after", 2)
    assert got == want
    assert POOL.dropped > dropped and POOL.dialled > dialled


async def test_a_connection_closed_while_checked_out_is_redialled_once(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    import services.kv.connpool as cp
    from services.kv.wire import Op, pack_req, read_resp

    pool = ConnPool()
    addr = node.eps[-1].address
    sock = await pool.dial("tcp", addr)
    await _until(lambda: len(node.server._conns) == 1, "the server accepted it")
    pool.give_back("tcp", addr, sock)
    # The server closes its side just after the pre-use check passed (the check is
    # skipped here): the header goes out on a dead connection.
    monkeypatch.setattr(cp, "_alive", lambda s: True)
    for task in list(node.server._conns):
        task.cancel()
    await _until(lambda: not node.server._conns, "the server closed it")
    e = node.store.reserve("redial", 64)
    loop = asyncio.get_running_loop()
    s2, (nbytes, _) = await pool.open_exchange(
        "tcp", addr, pack_req(Op.PUT, e.handle, "redial", 64), lambda s: read_resp(loop, s))
    assert pool.redialled == 1 and nbytes == 64 and s2 is not sock
    s2.close()  # the push never completes: the server takes the bytes back
    await asyncio.sleep(0.05)
    node.store.release(e.handle, "redial")


async def test_a_failed_transfer_is_never_pooled(node: Node) -> None:
    cfg = KvTransferConfig(kv_transports="tcp")
    node.server.faults = Faults.parse("drop_get@tcp#1")
    data = np.arange(HEADER_BYTES + 4096, dtype=np.uint8)
    e = node.store.reserve("f1", data.nbytes)
    await push_kv(cfg, Res(e.handle, node.eps), "f1", memoryview(data), TOKENS)
    pooled = sum(len(v) for v in POOL._idle.values())
    kv = common_pb2.KvRef(handle=e.handle, data_address=node.eps[-1].address,
                          endpoints=node.eps, nbytes=data.nbytes)
    with pytest.raises(Exception, match="KV fetch failed"):
        await fetch_kv(cfg, kv, "f1")
    # The push's connection was taken for the fetch, which broke: nothing new is pooled.
    assert sum(len(v) for v in POOL._idle.values()) == pooled - 1
    node.store.release(e.handle, "f1")


async def test_idle_connections_give_way_at_the_per_peer_limit() -> None:
    POOL.clear()
    n = await Node(max_conns=2).start()
    try:
        cfg = KvTransferConfig(kv_transports="tcp")
        # Two requests at once: two pooled connections from this peer, at its limit.
        await asyncio.gather(n.roundtrip(cfg, "a", 1), n.roundtrip(cfg, "b", 2))
        other = ConnPool()  # another client process: its new connection evicts an idle one
        got, want = await n.roundtrip(cfg, "c", 3)
        assert got == want
        sock = await other.dial("tcp", n.eps[-1].address)
        await _until(lambda: n.server.counters["evicted.idle"] >= 1, "an idle one evicted")
        assert n.server.counters["refused.per_peer_limit"] == 0
        sock.close()
        got, want = await n.roundtrip(cfg, "d", 4)  # the evicted one is dropped, redialled
        assert got == want
    finally:
        POOL.clear()
        await n.server.close()
    assert n.store.bytes_held == 0


async def test_the_server_closes_connections_idle_between_transfers() -> None:
    POOL.clear()
    n = await Node(idle_s=0.2).start()
    try:
        cfg = KvTransferConfig(kv_transports="shm")
        await n.roundtrip(cfg, "a", 1)
        await _until(lambda: not n.server._conns, "idle connections closed by the server")
        dropped = POOL.dropped
        got, want = await n.roundtrip(cfg, "b", 2)  # dead pooled sockets dropped at checkout
        assert got == want and POOL.dropped > dropped
    finally:
        POOL.clear()
        await n.server.close()


async def test_reserve_is_served_on_the_unix_socket_only(node: Node) -> None:
    from pdserve.v1 import kvstore_service_pb2
    from services.common.errors import PdserveError, ResourceExhausted
    from services.kv.base import Status, TransferError
    from services.kv.reserve import reserve_over_channel
    from services.kv.wire import Op, pack_req, read_resp

    async def reserver(rid: str, nbytes: int, lease_ms: int, owner: str):  # type: ignore[no-untyped-def]
        if nbytes > 1000:
            raise ResourceExhausted("full", reason="KV_CAPACITY")
        e = node.store.reserve(rid, nbytes, lease_ms / 1e3, owner=owner)
        res = kvstore_service_pb2.ReserveKvResponse(handle=e.handle, endpoints=node.eps)
        return res.SerializeToString(), lambda: node.store.release(e.handle, rid)

    node.server.reserver = reserver
    res = await reserve_over_channel(node.server.unix_path, "rsv", 512, 2000, "gw-1")
    entry = node.store.entries[res.handle]
    assert (entry.nbytes, entry.owner) == (512, "gw-1") and list(res.endpoints) == node.eps
    with pytest.raises(PdserveError) as ei:  # a refusal keeps its code and reason
        await reserve_over_channel(node.server.unix_path, "rsv2", 4096, 2000, "gw-1")
    assert ei.value.reason == "KV_CAPACITY" and ei.value.code.name == "RESOURCE_EXHAUSTED"
    # Over tcp (reachable from other hosts, with no cluster token): refused.
    loop = asyncio.get_running_loop()
    sock = await POOL.dial("tcp", node.eps[-1].address)
    try:
        await loop.sock_sendall(sock, pack_req(Op.RESERVE, "00" * 16, "rsv3", 64, 0)
                                + b"\0\0")
        with pytest.raises(TransferError) as te:
            await read_resp(loop, sock)
        assert te.value.status == Status.UNSUPPORTED
    finally:
        sock.close()
    node.store.release(res.handle, "rsv")
    assert node.server.counters["reserve.ok"] == 1
