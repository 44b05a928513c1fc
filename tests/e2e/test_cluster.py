"""The real processes from `pdserve up --model tiny`: identity, concurrency,
cancel, bad input and clean shutdown."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from pdserve.v1 import (
    decode_service_pb2,
    decode_service_pb2_grpc,
    generation_service_pb2,
    generation_service_pb2_grpc,
    kvstore_service_pb2,
    kvstore_service_pb2_grpc,
)
from services.model.info import ModelInfo
from services.model.tokenizer import TextTokenizer
from tests.e2e.conftest import UpProcess, pid_alive, start_up

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def reference_model():  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    info = ModelInfo.load("tiny")
    return TextTokenizer(info.path), AutoModelForCausalLM.from_pretrained(
        info.path, dtype=torch.float32).eval()


def generate_ref(model, ids: list[int], n: int) -> list[int]:  # type: ignore[no-untyped-def]
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                             do_sample=False)
    return [int(t) for t in out[0, len(ids):]]


def run(address: str, **kw: object) -> list[int]:
    with grpc.insecure_channel(address) as ch:
        stub = generation_service_pb2_grpc.GenerationServiceStub(ch)
        ids: list[int] = []
        for msg in stub.Generate(generation_service_pb2.GenerateRequest(**kw), timeout=120):
            ids.extend(msg.token_ids)
        return ids


@pytest.mark.parametrize(("prompt", "n"), [
    ("Hello there", 1), ("A slightly longer prompt for the cluster.", 17),
    ("Once upon a time " * 10, 48), ("é ✓ ünïcode", 30),
])
def test_token_identity_with_generate(tiny_cluster: UpProcess, reference_model, prompt: str,
                                      n: int) -> None:  # type: ignore[no-untyped-def]
    tok, model = reference_model
    assert run(tiny_cluster.address, prompt=prompt, max_tokens=n) == \
        generate_ref(model, tok.encode(prompt), n)


def test_concurrent_requests(tiny_cluster: UpProcess, reference_model) -> None:  # type: ignore[no-untyped-def]
    tok, model = reference_model
    prompts = [f"concurrent request {i}: " + "abc " * i for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda p: run(tiny_cluster.address, prompt=p, max_tokens=24),
                            prompts))
    for p, ids in zip(prompts, got, strict=True):
        assert ids == generate_ref(model, tok.encode(p), 24)


def _kv_held(up: UpProcess) -> int:
    with grpc.insecure_channel(str(up.ready("kvstore")["address"])) as ch:
        stub = kvstore_service_pb2_grpc.KvStoreServiceStub(ch)
        return int(stub.GetKvStoreStats(kvstore_service_pb2.GetKvStoreStatsRequest()).bytes_held)


def _decode_active(up: UpProcess) -> int:
    total = 0
    for name in ("decode-0", "decode-1"):
        with grpc.insecure_channel(str(up.ready(name)["address"])) as ch:
            stub = decode_service_pb2_grpc.DecodeServiceStub(ch)
            s = stub.GetDecodeStats(decode_service_pb2.GetDecodeStatsRequest())
            total += s.active + s.kv_bytes_held
    return total


def test_cancel_mid_stream_frees_kv(tiny_cluster: UpProcess) -> None:
    with grpc.insecure_channel(tiny_cluster.address) as ch:
        stub = generation_service_pb2_grpc.GenerationServiceStub(ch)
        call = stub.Generate(generation_service_pb2.GenerateRequest(
            prompt="please cancel me " * 10, max_tokens=600), timeout=120)
        seen = 0
        for msg in call:
            seen += len(msg.token_ids)
            if seen >= 4:
                assert _decode_active(tiny_cluster) > 0  # the decode really holds it now
                call.cancel()
                break
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (_kv_held(tiny_cluster) or
                                           _decode_active(tiny_cluster)):
        time.sleep(0.05)
    assert _kv_held(tiny_cluster) == 0
    assert _decode_active(tiny_cluster) == 0


def test_bad_input_then_still_serving(tiny_cluster: UpProcess) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        run(tiny_cluster.address, prompt_token_ids=[1, 2, 10**6])
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert len(run(tiny_cluster.address, prompt="still here", max_tokens=3)) >= 1


def test_clean_shutdown_leaves_no_process(tmp_path: Path) -> None:
    up = start_up(tmp_path / "up", "--model", "tiny", "--prefill", "1", "--decode", "1")
    assert len(run(up.address, prompt="one request before shutdown", max_tokens=4)) >= 1
    pids = up.child_pids()
    assert len(pids) == 4  # kvstore, prefill, decode, gateway
    assert up.stop() == 0
    assert "pdserve: stopped" in up.output()
    time.sleep(0.2)
    assert [p for p in pids if pid_alive(p)] == []
    # redis-server unlinks its socket only on a clean shutdown.
    assert (tmp_path / "up" / "redis" / "redis.log").exists()
    assert not (tmp_path / "up" / "redis" / "redis.sock").exists()
