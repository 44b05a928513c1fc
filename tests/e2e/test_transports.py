"""The KV data plane across real processes (`pdserve up --model tiny`): tcp and shm are
token-identical to in-process generate, say which path they took, and leave no KV held."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pdserve.v1 import (
    common_pb2,
    generation_service_pb2,
    generation_service_pb2_grpc,
    kvstore_service_pb2,
    kvstore_service_pb2_grpc,
)
from tests.e2e.conftest import UpProcess, start_up
from tests.e2e.test_cluster import generate_ref, reference_model  # noqa: F401 (fixture)

pytestmark = pytest.mark.e2e
PROMPT = "Transports carry the cache between processes. " * 3


def _up(tmp: Path, env: dict[str, str]) -> UpProcess:
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)  # start_up passes this process's environment to every child
        return start_up(tmp, "--model", "tiny", "--prefill", "1", "--decode", "1")


@pytest.fixture(scope="module", params=["tcp", "shm"])
def cluster(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, UpProcess]]:
    name = str(request.param)
    env = {"PDSERVE_KV_TRANSPORTS": "tcp"} if name == "tcp" else {}
    up = _up(tmp_path_factory.mktemp(f"up-{name}"), env)
    try:
        yield name, up
    finally:
        up.stop()


def _generate(address: str, n: int) -> tuple[list[int], common_pb2.Timings]:
    with grpc.insecure_channel(address) as ch:
        stub = generation_service_pb2_grpc.GenerationServiceStub(ch)
        ids: list[int] = []
        last = None
        for msg in stub.Generate(generation_service_pb2.GenerateRequest(
                prompt=PROMPT, max_tokens=n), timeout=60):
            ids.extend(msg.token_ids)
            last = msg
    assert last is not None
    return ids, last.timings


def _kv_stats(up: UpProcess) -> kvstore_service_pb2.GetKvStoreStatsResponse:
    with grpc.insecure_channel(str(up.ready("kvstore")["address"])) as ch:
        stub = kvstore_service_pb2_grpc.KvStoreServiceStub(ch)
        return stub.GetKvStoreStats(kvstore_service_pb2.GetKvStoreStatsRequest(), timeout=10)


def test_token_identical_and_path_reported(cluster: tuple[str, UpProcess],
                                           reference_model) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    name, up = cluster
    tok, model = reference_model
    got, t = _generate(up.address, 20)
    assert got == generate_ref(model, tok.encode(PROMPT), 20)
    assert t.kv_transport == name and not t.kv_fallback
    stats = _kv_stats(up)
    assert stats.transfers[f"{name}.put.ok"] >= 1 and stats.transfers[f"{name}.get.ok"] >= 1
    assert stats.bytes_held == 0
    if name == "shm":  # decode released its mapping once restored: the memfd is pooled again
        assert stats.transfers["shm.get.released"] >= 1
