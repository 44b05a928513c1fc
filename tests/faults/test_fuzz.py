"""Hypothesis through the public API and on the kvstore's raw data port of a real-process
cluster (tests/faults/fuzzing.py); bench/fuzz.py runs the same properties for thousands of
examples. After both: every process alive, nothing held, and requests still served."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from pdserve.v1 import generation_service_pb2
from tests.faults.fuzzing import ApiOracle, Tally, any_requests, data_frames, poke_data_port
from tests.faults.harness import ProcCluster

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]
API_EXAMPLES = 150
DATA_EXAMPLES = 60
FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])
TALLY = Tally()


@pytest.fixture(scope="module")
def oracle() -> ApiOracle:
    return ApiOracle("tiny", default_max_tokens=8)


def test_public_api_fuzz(cluster: ProcCluster, oracle: ApiOracle) -> None:
    address = cluster.procs["gateway-0"].address

    @settings(FUZZ, max_examples=API_EXAMPLES)
    @given(req=any_requests())
    def prop(req: generation_service_pb2.GenerateRequest) -> None:
        oracle.check(address, req, TALLY)

    prop()
    assert TALLY.counts["OK"] > 0 and TALLY.counts["INVALID_ARGUMENT"] > 0, TALLY


def test_data_port_fuzz(cluster: ProcCluster) -> None:
    host = cluster.procs["kvstore"].address.rpartition(":")[0]
    data_port = _data_port(cluster)

    @settings(FUZZ, max_examples=DATA_EXAMPLES)
    @given(frame=data_frames())
    def prop(frame: bytes) -> None:
        poke_data_port(host, data_port, frame, TALLY)

    prop()


def test_after_fuzzing_all_alive_nothing_held_still_serving(cluster: ProcCluster) -> None:
    assert sorted(cluster.alive()) == sorted(cluster.procs), {
        n: cluster.tail(n, 800) for n in cluster.procs if n not in cluster.alive()}
    assert cluster.settled_kv(2.0) == 0
    assert cluster.probe()
    print(f"fuzz outcomes: {TALLY}")


def _data_port(cluster: ProcCluster) -> int:
    """The kvstore's tcp data port, from its registry record."""
    import asyncio

    from services.cluster.registry import connect, list_instances

    async def find() -> str:
        client = connect(cluster.redis.url)
        try:
            found = await list_instances(client, cluster.group)
        finally:
            await client.aclose()
        return next(i.data_address for i in found if i.role == "kvstore")

    return int(asyncio.run(find()).rpartition(":")[2])
