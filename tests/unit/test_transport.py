"""Data plane against a real in-process data server and KV lifecycle: every transport, both
transfer modes, negotiation, fallback to tcp, fault injection, zero leaked bytes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
import pytest

from pdserve.v1 import common_pb2
from services.common.errors import DeadlineExceeded, Unavailable
from services.common.kvlayout import HEADER_BYTES
from services.common.runtime import host_id
from services.common.transport import DataServer, KvTransferConfig, pull_kv, push_kv
from services.common.transport.faults import Faults
from services.common.transport.negotiate import STATS, block_bytes, plan
from services.kvstore.memory import memfd_segment
from services.kvstore.store import KvStore

pytestmark = pytest.mark.unit
TOKENS = 64


@dataclass
class Reservation:  # the fields of a ReserveKvResponse that push_kv reads
    handle: str
    data_address: str
    endpoints: list[common_pb2.KvEndpoint]


@dataclass
class Node:
    store: KvStore
    server: DataServer
    endpoints: list[common_pb2.KvEndpoint]

    async def roundtrip(self, cfg: KvTransferConfig, data: np.ndarray, rid: str = "r1",
                        timeout_s: float | None = None) -> tuple[bytes, str, str, bool]:
        e = self.store.reserve(rid, data.nbytes)
        res = Reservation(e.handle, self.endpoints[-1].address, self.endpoints)
        pushed = await push_kv(cfg, res, rid, memoryview(data), TOKENS, timeout_s)
        kv = common_pb2.KvRef(handle=e.handle, data_address=res.data_address,
                              endpoints=self.endpoints, nbytes=data.nbytes, num_tokens=TOKENS)
        view, pulled = await pull_kv(cfg, kv, rid, timeout_s)
        return bytes(view), pushed.transport, pulled.transport, pushed.fallback or \
            pulled.fallback


@pytest.fixture()
async def node() -> AsyncIterator[Node]:
    store = KvStore(1 << 30, 30.0, allocate=memfd_segment)
    server = DataServer(store, max_transfer_s=5.0)
    port = await server.start("127.0.0.1", 0, shm=True)
    addr = f"127.0.0.1:{port}"
    eps = [common_pb2.KvEndpoint(transport="shm", address=server.unix_path, protocol="memfd",
                                 host_id=host_id()),
           common_pb2.KvEndpoint(transport="tcp", address=addr, protocol="tcp")]
    yield Node(store, server, eps)
    await server.close()
    assert store.bytes_held == 0, "KV bytes leaked"


async def _settle(node: Node, counter: str) -> None:
    for _ in range(100):
        if node.server.counters[counter]:
            return
        await asyncio.sleep(0.01)


def _data(nbytes: int = HEADER_BYTES + TOKENS * 1024) -> np.ndarray:
    return np.random.default_rng(nbytes).integers(0, 255, nbytes, dtype=np.uint8)


@pytest.mark.parametrize("transports", ["shm,tcp", "tcp"])
@pytest.mark.parametrize("mode", ["contiguous", "block"])
async def test_roundtrip_bytes_identical(node: Node, transports: str, mode: str) -> None:
    cfg = KvTransferConfig(kv_transports=transports, kv_transfer_mode=mode)
    data = _data()
    got, push_t, pull_t, fell_back = await node.roundtrip(cfg, data)
    assert got == data.tobytes()
    assert push_t == pull_t == transports.split(",")[0]
    assert not fell_back
    await _settle(node, f"{push_t}.get.ok")  # the server counts after the client is done
    assert node.server.counters[f"{push_t}.put.ok"] == 1
    assert node.server.counters[f"{push_t}.get.ok"] == 1


def test_a_block_is_n_tokens_of_one_layer() -> None:
    from services.common.kvlayout import KvMeta, encode_header

    meta = KvMeta("float32", num_layers=4, num_kv_heads=2, head_dim=8, num_tokens=64,
                  fingerprint="f")
    buf = bytearray(meta.total_nbytes)
    buf[:HEADER_BYTES] = encode_header(meta)
    cfg = KvTransferConfig(kv_transfer_mode="block", kv_block_tokens=16)
    page = 16 * 2 * 2 * 8 * 4  # tokens x (K, V) x heads x head_dim x fp32
    assert block_bytes(cfg, memoryview(buf), 64) == page
    assert meta.payload_nbytes // page == 4 * 4  # 4 layers x 4 blocks
    assert block_bytes(KvTransferConfig(), memoryview(buf), 64) == 0


async def test_block_mode_confirms_each_block(node: Node) -> None:
    cfg = KvTransferConfig(kv_transports="tcp", kv_transfer_mode="block", kv_block_tokens=16)
    data = _data()
    got, *_ = await node.roundtrip(cfg, data)
    assert got == data.tobytes()  # 4 blocks each way, each acknowledged before the next


def test_plan_prefers_shm_on_same_host_only(node: Node) -> None:
    cfg = KvTransferConfig()
    best, fb = plan(cfg, node.endpoints, host_id())
    assert best.transport == "shm" and fb is not None and fb.transport == "tcp"
    best, fb = plan(cfg, node.endpoints, "another-host")
    assert best.transport == "tcp" and fb is None
    best, fb = plan(KvTransferConfig(kv_fallback=False), node.endpoints, host_id())
    assert best.transport == "shm" and fb is None


@pytest.mark.parametrize("fault", ["refuse_shm", "drop_put@shm#1", "drop_get@shm#1",
                                   "stall_put@shm#1"])
async def test_shm_failure_falls_back_to_tcp_visibly(node: Node, fault: str) -> None:
    node.server.faults = Faults.parse(fault)
    before = STATS.fallbacks
    data = _data()
    got, push_t, pull_t, fell_back = await node.roundtrip(KvTransferConfig(), data,
                                                          timeout_s=2.0)
    assert got == data.tobytes()
    assert fell_back and STATS.fallbacks > before
    assert "tcp" in (push_t, pull_t)
    assert sum(v for k, v in node.server.counters.items() if k.endswith(".fallback")) >= 1


async def test_no_fallback_setting_fails_fast(node: Node) -> None:
    node.server.faults = Faults.parse("refuse_shm")
    cfg = KvTransferConfig(kv_fallback=False)
    e = node.store.reserve("nf", 4096)
    res = Reservation(e.handle, node.endpoints[-1].address, node.endpoints)
    with pytest.raises(Unavailable) as ei:
        await push_kv(cfg, res, "nf", memoryview(_data(4096)), TOKENS)
    assert ei.value.reason == "KV_TRANSFER_FAILED" and "shm" in ei.value.message
    node.store.release(e.handle, "nf")


async def test_tcp_drop_mid_push_aborts_and_frees(node: Node) -> None:
    node.server.faults = Faults.parse("drop_put@tcp")
    e = node.store.reserve("dp", 1 << 20)
    res = Reservation(e.handle, node.endpoints[-1].address, node.endpoints)
    with pytest.raises(Unavailable):
        await push_kv(KvTransferConfig(kv_transports="tcp"), res, "dp",
                      memoryview(_data(1 << 20)), TOKENS)
    await asyncio.sleep(0.05)
    assert node.store.bytes_held == 0  # aborted at once: no retry was announced


async def test_stalled_transfer_ends_with_deadline_exceeded(node: Node) -> None:
    node.server.faults = Faults.parse("stall_put")
    e = node.store.reserve("st", 1 << 20)
    res = Reservation(e.handle, node.endpoints[-1].address, node.endpoints)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(DeadlineExceeded) as ei:
        await push_kv(KvTransferConfig(), res, "st", memoryview(_data(1 << 20)), TOKENS,
                      timeout_s=0.6)
    assert ei.value.reason == "KV_TRANSFER_TIMEOUT"
    assert loop.time() - t0 < 2.0  # bounded by the budget, never a hang
    node.store.release(e.handle, "st")  # what prefill does on failure


async def test_wrong_request_id_cannot_fetch(node: Node) -> None:
    data = _data(4096)
    e = node.store.reserve("owner", data.nbytes)
    res = Reservation(e.handle, node.endpoints[-1].address, node.endpoints)
    await push_kv(KvTransferConfig(), res, "owner", memoryview(data), TOKENS)
    kv = common_pb2.KvRef(handle=e.handle, endpoints=node.endpoints, nbytes=data.nbytes)
    for transports in ("shm,tcp", "tcp"):
        with pytest.raises(Unavailable) as ei:
            await pull_kv(KvTransferConfig(kv_transports=transports), kv, "intruder")
        assert "no such KV handle" in ei.value.message
    view, _ = await pull_kv(KvTransferConfig(), kv, "owner")
    assert bytes(view) == data.tobytes()


async def test_shm_fetch_is_a_mapping_not_a_copy(node: Node) -> None:
    data = _data(1 << 20)
    e = node.store.reserve("map", data.nbytes)
    res = Reservation(e.handle, node.endpoints[-1].address, node.endpoints)
    await push_kv(KvTransferConfig(), res, "map", memoryview(data), TOKENS)
    seg = node.store.segment_of(e.handle)
    assert seg is not None and seg.fd >= 0
    kv = common_pb2.KvRef(handle=e.handle, endpoints=node.endpoints, nbytes=data.nbytes)
    view, result = await pull_kv(KvTransferConfig(), kv, "map")
    assert result.transport == "shm" and view.obj.__class__.__name__ == "mmap"
    assert bytes(view[:64]) == data[:64].tobytes()
    assert node.store.bytes_held == 0


async def test_client_killed_mid_push_frees_at_once(node: Node) -> None:
    """A prefill that dies mid-push closes its socket: the kvstore aborts the entry now,
    not at lease expiry."""
    from services.common.transport.wire import Op, connect_tcp, pack_req, read_resp

    loop = asyncio.get_running_loop()
    e = node.store.reserve("dead", 1 << 20)
    sock = await connect_tcp(node.endpoints[-1].address)
    await loop.sock_sendall(sock, pack_req(Op.PUT, e.handle, "dead", 1 << 20))
    await read_resp(loop, sock)
    await loop.sock_sendall(sock, b"x" * 1000)
    sock.close()
    for _ in range(100):
        if node.store.bytes_held == 0:
            break
        await asyncio.sleep(0.01)
    assert node.store.bytes_held == 0 and node.store.counters.aborted_total == 1
