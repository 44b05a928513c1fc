"""The request path through in-process services: identity, errors, cancel, trace."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pdserve.v1 import common_pb2, generation_service_pb2
from services.common.errors import error_info
from tests.cluster import Cluster
from tests.integration.conftest import reference

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(("prompt", "max_tokens"), [
    ("Hello, world!", 8), ("The quick brown fox jumps over the lazy dog. " * 4, 24),
    ("x", 1), ("Once upon a time", 40),
])
async def test_greedy_is_token_identical_to_generate(
    cluster: Cluster, tiny, prompt: str, max_tokens: int  # type: ignore[no-untyped-def]
) -> None:
    info, tok, model = tiny
    ids = tok.encode(prompt)
    got, text, last = await cluster.generate(prompt=prompt, max_tokens=max_tokens)
    want = reference(model, ids, max_tokens)
    assert got == want
    assert text == tok.decode(got)
    assert last.prompt_tokens == len(ids)
    stopped = want[-1] in info.eos_token_ids
    assert last.finish_reason == (common_pb2.FINISH_REASON_STOP if stopped
                                  else common_pb2.FINISH_REASON_LENGTH)
    t = last.timings
    # Prefill, kvstore and decode share this host: shm is negotiated, with no fallback.
    # One token: no decode follows, so no KV moves at all (test_first_token_only.py).
    assert t.ttft_ms > 0 and t.e2e_ms >= t.ttft_ms
    assert t.kv_transport == ("shm" if max_tokens > 1 else "")
    assert not t.kv_fallback
    assert (t.mean_tpot_ms > 0) == (len(got) > 1)


async def test_chat_template_and_token_ids_agree(cluster: Cluster, tiny) -> None:  # type: ignore[no-untyped-def]
    _, tok, model = tiny
    ids = tok.encode_chat("What is the capital of France?")
    by_text, _, _ = await cluster.generate(prompt="What is the capital of France?",
                                           use_chat_template=True, max_tokens=16)
    by_ids, _, _ = await cluster.generate(prompt_token_ids=ids, max_tokens=16)
    assert by_text == by_ids == reference(model, ids, 16)


async def test_concurrent_requests_are_each_identical(cluster: Cluster, tiny) -> None:  # type: ignore[no-untyped-def]
    _, tok, model = tiny
    prompts = [f"request number {i} says hi" for i in range(6)]
    results = await asyncio.gather(*(cluster.generate(prompt=p, max_tokens=20) for p in prompts))
    for p, (got, _, _) in zip(prompts, results, strict=True):
        assert got == reference(model, tok.encode(p), 20)
    stats = await cluster.kv_stats()
    assert stats.bytes_held == 0 and stats.entries == 0


async def test_seeded_sampling_is_reproducible(cluster: Cluster) -> None:
    kw = dict(prompt="sample me", max_tokens=16, temperature=0.9, top_p=0.95, seed=7)
    a, _, _ = await cluster.generate(**kw)
    b, _, _ = await cluster.generate(**kw)
    assert a == b


async def test_stop_string_ends_the_stream_before_it(cluster: Cluster) -> None:
    _, full_text, _ = await cluster.generate(prompt="stop test", max_tokens=30)
    spans = [full_text[i:i + 2] for i in range(2, len(full_text) - 2)
             if "\ufffd" not in full_text[i:i + 2]]
    assert spans, "the tiny model's output should contain printable text"
    stop = spans[0]
    _, text, last = await cluster.generate(prompt="stop test", max_tokens=30, stop=[stop])
    assert last.finish_reason == common_pb2.FINISH_REASON_STOP
    assert stop not in text
    assert full_text.startswith(text)


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"prompt": ""}, "EMPTY_PROMPT"),
    ({"prompt_token_ids": [1, 2, 999_999]}, "TOKEN_OUT_OF_VOCAB"),
    ({"prompt_token_ids": [5] * 1024}, "PROMPT_TOO_LONG"),
    ({"prompt": "hi", "max_tokens": 0}, "INVALID_ARGUMENT"),
    ({"prompt": "hi", "max_tokens": -3}, "INVALID_ARGUMENT"),
    ({"prompt": "hi", "max_tokens": 5000}, "MAX_TOKENS_TOO_LARGE"),
    ({"prompt": "hi", "model": "gpt-17"}, "UNKNOWN_MODEL"),
])
async def test_bad_input_is_invalid_argument_and_cluster_keeps_serving(
    cluster: Cluster, kwargs: dict[str, object], reason: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await cluster.generate(request_id="bad-1", **kwargs)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(exc.value)
    assert info is not None and info.reason == reason and info.domain == "pdserve"
    assert info.metadata["request_id"] == "bad-1"
    assert exc.value.details()  # a message a user can act on
    ids, _, _ = await cluster.generate(prompt="still serving", max_tokens=3)
    assert len(ids) >= 1


async def test_cancel_mid_stream_frees_kv_everywhere(cluster: Cluster) -> None:
    call = cluster.stub.Generate(generation_service_pb2.GenerateRequest(
        prompt="cancel me " * 20, max_tokens=400))
    got = 0
    async for msg in call:
        got += len(msg.token_ids)
        if got >= 3:
            call.cancel()
            break
    for _ in range(100):  # the cancel propagates asynchronously
        decodes = await cluster.decode_stats()
        kv = await cluster.kv_stats()
        if kv.bytes_held == 0 and all(d.active == 0 for d in decodes):
            break
        await asyncio.sleep(0.05)
    assert kv.bytes_held == 0 and kv.entries == 0
    assert all(d.active == 0 and d.kv_bytes_held == 0 for d in decodes)
    assert sum(d.cancelled_total for d in decodes) >= 1


async def test_ttft_deadline_is_deadline_exceeded(cluster: Cluster) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await cluster.generate(prompt_token_ids=[7] * 900, max_tokens=4, ttft_deadline_ms=1)
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.sleep(0.3)
    assert (await cluster.kv_stats()).bytes_held == 0


async def test_grpc_deadline_is_honoured(cluster: Cluster) -> None:
    from services.common import faultpoints

    # Hold the request between prefill and decode for longer than its deadline: the tiny
    # model can otherwise finish a whole answer inside any short deadline on a quiet day.
    faultpoints.install("gateway.before_decode=2")
    try:
        call = cluster.stub.Generate(generation_service_pb2.GenerateRequest(
            prompt="slow " * 50, max_tokens=700), timeout=0.5)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            async for _ in call:
                pass
    finally:
        faultpoints.install("")
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.sleep(0.3)
    assert (await cluster.kv_stats()).bytes_held == 0  # the deadline freed the staged KV
