"""``rdma`` through the Mooncake Transfer Engine, in its own TCP mode (no RDMA device can
exist on this machine): the real library moves the bytes; the protocol is reported."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import pytest

from pdserve.v1 import common_pb2
from services.common.runtime import host_id
from services.kv import KvTransferConfig
from services.kv.layout import HEADER_BYTES
from services.kv.negotiate import plan
from services.kv.rdma import (
    engine_for,
    mooncake_importable,
    rdma_devices,
    wire_protocol,
)
from services.kvstore.dataserver import DataServer
from services.kvstore.faults import Faults
from services.kvstore.memory import heap_segment
from services.kvstore.store import KvStore
from tests.unit.test_transport import TOKENS, Node

pytestmark = [pytest.mark.unit, pytest.mark.skipif(
    not mooncake_importable(),
    reason="Mooncake cannot be imported: install the 'rdma' extra and Debian libibverbs1 "
           "(scripts/bootstrap.sh does both)")]
CFG = KvTransferConfig(kv_transports="rdma,tcp", kv_rdma_tcp_mode=True)


@pytest.fixture()
async def node() -> AsyncIterator[Node]:
    store = KvStore(1 << 30, 30.0, allocate=heap_segment)
    server = DataServer(store, max_transfer_s=10.0)
    port = await server.start("127.0.0.1", 0)
    server.rdma_engine = engine_for("127.0.0.1")
    addr = f"127.0.0.1:{port}"
    eps = [common_pb2.KvEndpoint(transport="rdma", address=addr,
                                 protocol=server.rdma_engine.protocol, host_id=host_id()),
           common_pb2.KvEndpoint(transport="tcp", address=addr, protocol="tcp")]
    yield Node(store, server, eps)
    await server.close()
    assert store.bytes_held == 0, "KV bytes leaked"


def test_protocol_is_detected_not_assumed() -> None:
    assert wire_protocol() == ("rdma" if rdma_devices() else "tcp")
    assert rdma_devices("/nonexistent") == []
    assert engine_for("127.0.0.1").protocol == wire_protocol()


async def test_rdma_roundtrip_reports_the_wire_protocol(node: Node) -> None:
    data = np.random.default_rng(1).integers(0, 255, HEADER_BYTES + TOKENS * 4096,
                                             dtype=np.uint8)
    got, push_t, pull_t, fell_back = await node.roundtrip(CFG, data)
    assert got == data.tobytes() and not fell_back
    assert push_t == pull_t == f"rdma/{wire_protocol()}"  # "rdma/tcp" here: never silent


def test_rdma_in_tcp_mode_is_opt_in(node: Node) -> None:
    best, _ = plan(KvTransferConfig(kv_transports="rdma,tcp"), node.endpoints, host_id())
    assert best.transport == ("rdma" if rdma_devices() else "tcp")
    best, _ = plan(CFG, node.endpoints, host_id())
    assert best.transport == "rdma"
    # A kvstore whose engine runs another wire protocol cannot be paired (Mooncake #553).
    other = [common_pb2.KvEndpoint(transport="rdma", address="x:1", protocol="other"),
             node.endpoints[-1]]
    assert plan(CFG, other, host_id())[0].transport == "tcp"


async def test_broken_rdma_falls_back_to_tcp(node: Node) -> None:
    node.server.faults = Faults.parse("drop_put@rdma#1")
    data = np.arange(HEADER_BYTES + TOKENS * 64, dtype=np.uint32).view(np.uint8)
    got, push_t, pull_t, fell_back = await node.roundtrip(CFG, data, timeout_s=5.0)
    assert got == data.tobytes() and fell_back
    assert push_t == "tcp" and pull_t.startswith("rdma/")
