"""Data plane against a real in-process data server and KV lifecycle: every transport, both
transfer modes, negotiation, fallback to tcp, fault injection, zero leaked bytes."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
import pytest

from pdserve.v1 import common_pb2
from services.common.errors import DeadlineExceeded, Unavailable
from services.common.runtime import host_id
from services.kv import (
    KvTransferConfig,
    fetch_kv,
    pull_kv,
    push_kv,
)
from services.kv.layout import HEADER_BYTES, KvMeta, encode_header, verify
from services.kv.negotiate import STATS, block_bytes, plan
from services.kv.shm import MAPPINGS
from services.kvstore.dataserver import DataServer
from services.kvstore.faults import Faults
from services.kvstore.memory import SegmentPool, memfd_segment
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
    from services.kv.layout import KvMeta, encode_header

    meta = KvMeta("float32", num_layers=4, num_kv_heads=2, head_dim=8, num_tokens=64,
                  fingerprint="f")
    buf = bytearray(meta.total_nbytes)
    buf[:HEADER_BYTES] = encode_header(meta)
    cfg = KvTransferConfig(kv_transfer_mode="block", kv_block_tokens=16)
    page = 16 * 2 * 2 * 8 * 4  # tokens x (K, V) x heads x head_dim x fp32
    assert block_bytes(cfg, memoryview(buf), 64) == page
    assert meta.payload_nbytes // page == 4 * 4  # 4 layers x 4 blocks
    assert block_bytes(KvTransferConfig(), memoryview(buf), 64) == 0


async def test_block_mode_confirms_each_block(node: Node,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import services.kv.tcp as tcp

    confirmed = {"push": 0, "fetch": 0}
    real = tcp.read_resp

    async def counting(*args: object, **kw: object) -> object:
        sender = sys._getframe(1)
        if sender.f_code.co_name == "send_blocks":  # a block's confirmation
            server = "dataserver" in sender.f_back.f_code.co_filename  # type: ignore[union-attr]
            confirmed["fetch" if server else "push"] += 1
        return await real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(tcp, "read_resp", counting)
    cfg = KvTransferConfig(kv_transports="tcp", kv_transfer_mode="block", kv_block_tokens=16)
    data = _data()
    blocks = -(-len(data) // block_bytes(cfg, memoryview(data), TOKENS))
    got, *_ = await node.roundtrip(cfg, data)
    assert got == data.tobytes()
    # push (prefill -> kvstore): every block acknowledged before the next; the fetch
    # (kvstore -> decode) goes in the server's pages, also one acknowledgement each
    assert confirmed["push"] == blocks and confirmed["fetch"] >= 2, confirmed


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
    from services.kv.wire import Op, connect_tcp, pack_req, read_resp

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


@pytest.fixture()
async def pooled() -> AsyncIterator[tuple[Node, SegmentPool]]:
    """A node whose kvstore pools its memfds, as the kvstore process does."""
    pool = SegmentPool(granule=4096)
    store = KvStore(1 << 30, 30.0, allocate=pool.allocate, recycle=pool.recycle)
    server = DataServer(store, max_transfer_s=5.0)
    port = await server.start("127.0.0.1", 0, shm=True)
    eps = [common_pb2.KvEndpoint(transport="shm", address=server.unix_path, protocol="memfd",
                                 host_id=host_id()),
           common_pb2.KvEndpoint(transport="tcp", address=f"127.0.0.1:{port}", protocol="tcp")]
    yield Node(store, server, eps), pool
    await server.close()
    assert store.bytes_held == 0, "KV bytes leaked"
    pool.close()


async def _staged(node: Node, rid: str, data: np.ndarray) -> common_pb2.KvRef:
    e = node.store.reserve(rid, data.nbytes)
    res = Reservation(e.handle, node.endpoints[-1].address, node.endpoints)
    await push_kv(KvTransferConfig(), res, rid, memoryview(data), TOKENS)
    return common_pb2.KvRef(handle=e.handle, endpoints=node.endpoints, nbytes=data.nbytes)


async def test_shm_fetch_released_after_copy_out_goes_back_to_the_pool(
        pooled: tuple[Node, SegmentPool]) -> None:
    node, pool = pooled
    data = _data(1 << 20)
    hits = MAPPINGS.hits
    for i in range(3):
        kv = await _staged(node, f"p{i}", data)
        async with await fetch_kv(KvTransferConfig(), kv, f"p{i}") as f:
            assert f.result.transport == "shm"
            out = np.frombuffer(f.view, dtype=np.uint8).copy()  # the restore's copy
        assert out.tobytes() == data.tobytes()
        assert node.server.counters["shm.get.released"] == i + 1
    # Each push after the first lands in the pooled memfd, through the cached mapping.
    assert pool.reused == 2 and MAPPINGS.hits - hits == 2
    assert node.store.bytes_held == 0 and pool.idle_bytes > 0


async def test_shm_fetch_cancelled_mid_restore_is_never_reused(
        pooled: tuple[Node, SegmentPool]) -> None:
    node, pool = pooled
    data = _data(1 << 20)
    kv = await _staged(node, "c", data)
    reader = asyncio.Event()

    async def restore() -> None:
        async with await fetch_kv(KvTransferConfig(), kv, "c"):
            reader.set()
            await asyncio.sleep(30)  # a restore still running when the call is cancelled

    task = asyncio.create_task(restore())
    await reader.wait()
    assert node.store.bytes_held == 0  # CONSUMED once mapped; the pages are lent out
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _settle(node, "shm.get.unreleased")
    assert pool.idle_bytes == 0 and pool.reused == 0  # closed, not pooled


async def test_shm_fetch_still_referenced_at_release_is_never_reused(
        pooled: tuple[Node, SegmentPool]) -> None:
    node, pool = pooled
    data = _data(1 << 20)
    kv = await _staged(node, "k", data)
    async with await fetch_kv(KvTransferConfig(), kv, "k") as f:
        kept = np.frombuffer(f.view, dtype=np.uint8)  # outlives the release
    assert node.server.counters["shm.get.unreleased"] == 1
    assert kept[:64].tobytes() == data[:64].tobytes()
    assert pool.idle_bytes == 0 and node.store.bytes_held == 0
    view, _ = await pull_kv(KvTransferConfig(), await _staged(node, "m", data), "m")
    await _settle(node, "shm.get.ok")
    for _ in range(100):
        if node.server.counters["shm.get.unreleased"] == 2:
            break
        await asyncio.sleep(0.01)
    assert pool.idle_bytes == 0  # a kept mapping (pull_kv) is never reused either
    del kept, view


def _kv_buffer(layers: int = 4) -> tuple[np.ndarray, KvMeta]:
    meta = KvMeta("float32", num_layers=layers, num_kv_heads=2, head_dim=8, num_tokens=TOKENS,
                  fingerprint="f")
    buf = _data(meta.total_nbytes)
    return buf, meta


async def test_layered_push_sends_layers_during_compute_and_the_header_last(node: Node) -> None:
    from services.kv.layers import LayerPush

    want, meta = _kv_buffer()
    cfg = KvTransferConfig(kv_transports="tcp", kv_layer_overlap=True)
    e = node.store.reserve("lay", want.nbytes)
    res = Reservation(e.handle, node.endpoints[-1].address, node.endpoints)
    buf = np.zeros_like(want)
    push = await LayerPush.open(cfg, res, "lay", buf, meta.num_layers, True, host_id())
    assert push is not None

    def compute() -> None:  # the model thread: each layer lands, then is announced
        for i in range(meta.num_layers):
            off = meta.layer_offset(i)
            buf[off : off + meta.layer_nbytes] = want[off : off + meta.layer_nbytes]
            push.layer_done(i)

    await asyncio.to_thread(compute)

    def header(crc: int) -> bytes:
        raw = encode_header(KvMeta(**{**meta.__dict__, "payload_crc32": crc}))
        buf[:HEADER_BYTES] = np.frombuffer(raw, dtype=np.uint8)
        return raw

    result = await push.finish(header)
    assert result.transport == "tcp" and not result.fallback
    assert node.server.counters["tcp.put.layered"] == 1
    kv = common_pb2.KvRef(handle=e.handle, endpoints=node.endpoints, nbytes=buf.nbytes)
    view, _ = await pull_kv(cfg, kv, "lay")
    assert verify(view, "f").payload_crc32 == zlib.crc32(want[HEADER_BYTES:])
    assert bytes(view[HEADER_BYTES:]) == want[HEADER_BYTES:].tobytes()


async def test_layered_push_is_not_used_on_shm_and_an_aborted_one_is_freed_by_release(
        node: Node) -> None:
    from services.kv.layers import LayerPush

    buf, meta = _kv_buffer()
    e = node.store.reserve("ab", buf.nbytes)
    res = Reservation(e.handle, node.endpoints[-1].address, node.endpoints)
    cfg = KvTransferConfig(kv_layer_overlap=True)
    assert await LayerPush.open(cfg, res, "ab", buf, meta.num_layers, True, host_id()) is None
    push = await LayerPush.open(KvTransferConfig(kv_transports="tcp"), res, "ab", buf,
                                meta.num_layers, True, host_id())
    assert push is not None
    push.layer_done(0)
    await asyncio.sleep(0.05)
    push.abort()  # compute failed: the connection closes mid-stream
    await _settle(node, "tcp.put.failed")
    assert node.server.counters["tcp.put.failed"] == 1
    # The broken push left the reservation staged but unfilled: nothing was handed off,
    # and the kvstore still holds it until prefill releases it (the handoff does on any
    # failure), which frees every byte.
    assert node.store.bytes_held == buf.nbytes
    node.store.release(e.handle, "ab")
    assert node.store.bytes_held == 0 and not node.store.entries


async def test_tcp_fetch_held_receives_into_a_released_buffer(node: Node) -> None:
    from services.kv.tcp import RECV_POOL

    cfg = KvTransferConfig(kv_transports="tcp")
    data = _data(1 << 20)
    reused = RECV_POOL.reused
    for i in range(2):
        kv = await _staged(node, f"t{i}", data)
        async with await fetch_kv(cfg, kv, f"t{i}") as f:
            assert bytes(f.view) == data.tobytes()
    assert RECV_POOL.reused == reused + 1  # the second fetch landed in the first's buffer
    kv = await _staged(node, "t2", data)
    async with await fetch_kv(cfg, kv, "t2") as f:  # takes the pooled buffer...
        kept = np.frombuffer(f.view, dtype=np.uint8)  # ...still read after the release
    assert RECV_POOL.reused == reused + 2
    kv = await _staged(node, "t3", data)
    async with await fetch_kv(cfg, kv, "t3") as f:
        assert bytes(f.view) == data.tobytes()
    assert RECV_POOL.reused == reused + 2  # so t2's buffer was not pooled: t3 got a fresh one
    assert kept.tobytes() == data.tobytes()


async def test_concurrent_shm_pushes_share_the_mapping_cache_safely(
        pooled: tuple[Node, SegmentPool]) -> None:
    """Pushes above THREAD_COPY_BYTES map and copy on executor threads; a small cache
    evicts while others copy."""
    node, _ = pooled
    cfg = KvTransferConfig(kv_client_cache_mb=24)
    data = _data(9 << 20)

    async def handoff(i: int) -> bytes:
        e = node.store.reserve(f"c{i}", data.nbytes)
        res = Reservation(e.handle, node.endpoints[-1].address, node.endpoints)
        pushed = await push_kv(cfg, res, f"c{i}", memoryview(data), TOKENS)
        assert pushed.transport == "shm" and not pushed.fallback
        kv = common_pb2.KvRef(handle=e.handle, endpoints=node.endpoints, nbytes=data.nbytes)
        async with await fetch_kv(cfg, kv, f"c{i}") as f:
            return bytes(f.view)

    for _ in range(2):
        got = await asyncio.gather(*(handoff(i) for i in range(8)))
        assert all(g == data.tobytes() for g in got)
    assert MAPPINGS.bytes <= 24 << 20
