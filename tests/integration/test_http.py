"""The gateway's OpenAI-compatible HTTP door against an in-process cluster (tiny model):
the official openai client, SSE framing, usage, errors with their statuses, API keys,
and a client disconnect that frees the request's KV everywhere."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import openai
import pytest

from services.gateway.main import GatewayRuntime
from tests.cluster import Cluster

pytestmark = pytest.mark.integration

PROMPT = "What is the capital of France?"


def _base(c: Cluster, gateway: int = 0) -> str:
    rt = c.gateway_nodes[gateway][0]
    assert isinstance(rt, GatewayRuntime) and rt.http is not None
    return f"http://127.0.0.1:{rt.http.port}"


async def _grpc_text(c: Cluster, **kw: Any) -> tuple[list[int], str]:
    ids, text, _ = await c.generate(prompt=PROMPT, use_chat_template=True, temperature=0.0, **kw)
    return ids, text


async def test_openai_client_streams_the_grpc_answer(redis_url: str) -> None:
    async with Cluster(redis_url) as c:
        ids, want = await _grpc_text(c, max_tokens=24)
        client = openai.AsyncOpenAI(base_url=_base(c) + "/v1", api_key="unused", max_retries=0)
        stream = await client.chat.completions.create(
            model="", messages=[{"role": "user", "content": PROMPT}], temperature=0,
            max_tokens=24, stream=True, stream_options={"include_usage": True})
        parts, finish, usage = [], None, None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for ch in chunk.choices:
                parts.append(ch.delta.content or "")
                finish = ch.finish_reason or finish
        assert "".join(parts) == want
        assert usage is not None and usage.completion_tokens == len(ids)
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert finish in ("stop", "length")

        # Non-streaming: same text, usage, OpenAI object shape.
        full = await client.chat.completions.create(
            model="", messages=[{"role": "user", "content": PROMPT}], temperature=0,
            max_completion_tokens=24)
        assert full.choices[0].message.content == want
        assert full.usage is not None and full.usage.completion_tokens == len(ids)
        assert full.object == "chat.completion" and full.id.startswith("chatcmpl-")

        # /v1/completions on a raw prompt equals gRPC without the chat template.
        raw_ids, raw_text, _ = await c.generate(prompt="The sky is", temperature=0.0,
                                                max_tokens=12)
        comp = await client.completions.create(model="", prompt="The sky is", temperature=0,
                                               max_tokens=12)
        assert comp.choices[0].text == raw_text
        assert comp.usage is not None and comp.usage.completion_tokens == len(raw_ids)
        models = await client.models.list()
        assert [m.id for m in models.data] == [c.gateway_nodes[0][1].info.name]
        await client.close()


async def test_sse_framing_and_extras(redis_url: str) -> None:
    async with Cluster(redis_url) as c, httpx.AsyncClient(base_url=_base(c)) as http:
        body = {"prompt": "Hello", "max_tokens": 8, "temperature": 0, "stream": True,
                "request_id": "client-rid-1"}
        lines = []
        async with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["x-request-id"] == "client-rid-1"
            async for line in r.aiter_lines():
                lines.append(line)
        events = [ln for ln in lines if ln]
        assert all(ln.startswith("data: ") for ln in events)
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(ln[6:]) for ln in events[:-1]]
        assert all(ch["id"] == "cmpl-client-rid-1" for ch in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert all("usage" not in ch for ch in chunks)  # only with include_usage

        # The readiness and liveness endpoints, and /metrics on the HTTP port.
        assert (await http.get("/health")).status_code == 200
        ready = await http.get("/ready")
        assert ready.status_code == 200, ready.text
        assert "pdserve:time_to_first_token_seconds" in (await http.get("/metrics")).text


@pytest.mark.parametrize(("body", "status", "code", "param"), [
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "UNSUPPORTED_PARAMETER",
     "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400,
     "INVALID_ARGUMENT", "temperature"),
    ({"messages": []}, 400, "INVALID_ARGUMENT", "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400,
     "MAX_TOKENS_TOO_LARGE", None),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-9"}, 404,
     "UNKNOWN_MODEL", None),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400,
     "UNSUPPORTED_PARAMETER", "logprobs"),
])
async def test_errors_are_openai_json(redis_url: str, body: dict[str, Any], status: int,
                                      code: str, param: str | None) -> None:
    async with Cluster(redis_url) as c, httpx.AsyncClient(base_url=_base(c)) as http:
        for stream in (False, True):
            r = await http.post("/v1/chat/completions", json={**body, "stream": stream})
            assert r.status_code == status, r.text
            err = r.json()["error"]
            assert err["code"] == code and err["message"]
            assert err["type"] and err["param"] == param
        bad = await http.post("/v1/chat/completions", content=b"{not json")
        assert bad.status_code == 400


async def test_unknown_scenario_refused_and_ttft_deadline_is_504(redis_url: str) -> None:
    overrides = {"unknown_scenario": "refuse"}
    async with Cluster(redis_url, gateway_overrides=overrides,
                       worker_overrides={"emulate_prefill_ms_per_token": 20.0}) as c, \
            httpx.AsyncClient(base_url=_base(c)) as http:
        r = await http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                            headers={"X-Pdserve-Scenario": "nope"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "UNKNOWN_SCENARIO"
        # A 1 ms TTFT deadline cannot be met by a prefill emulating 20 ms per token.
        r = await http.post("/v1/completions", json={
            "prompt": "a long enough prompt " * 8, "max_tokens": 2, "ttft_deadline_ms": 1})
        assert r.status_code == 504, r.text
        assert r.json()["error"]["type"] == "timeout"


async def test_api_key(redis_url: str) -> None:
    async with Cluster(redis_url, gateway_overrides={"api_key": "k1,k2"}) as c, \
            httpx.AsyncClient(base_url=_base(c)) as http:
        body = {"prompt": "hi", "max_tokens": 2}
        r = await http.post("/v1/completions", json=body)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"
        r = await http.post("/v1/completions", json=body, headers={"Authorization": "Bearer no"})
        assert r.status_code == 401
        for key in ("k1", "k2"):
            r = await http.post("/v1/completions", json=body,
                                headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
        assert (await http.get("/health")).status_code == 200  # probes need no key
        assert (await http.get("/v1/models")).status_code == 401


async def _kv_idle(c: Cluster, within_s: float = 10.0) -> None:
    end = time.monotonic() + within_s
    while True:
        kv = await c.kv_stats()
        dec = await c.decode_stats()
        if kv.bytes_held == 0 and all(d.active == 0 and d.kv_bytes_held == 0 for d in dec):
            return
        assert time.monotonic() < end, (kv, dec)
        await asyncio.sleep(0.05)


async def test_disconnect_frees_kv_everywhere(redis_url: str) -> None:
    # The mock engine with SmolLM2's CPU profile decodes ~50 ms a token, so a 400-token
    # answer is surely still running when the client leaves.
    async with Cluster(redis_url, model="mock:smollm2-cpu") as c:
        body = {"prompt": [20] * 16, "max_tokens": 400, "stream": True}
        async with httpx.AsyncClient(base_url=_base(c)) as http:
            got = 0
            async with http.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    got += line.startswith("data: {")
                    if got >= 3:
                        held = await c.decode_stats()  # decoding, its KV in the pool
                        assert sum(d.active for d in held) == 1
                        assert sum(d.kv_bytes_held for d in held) > 0
                        break  # leave mid-stream: the connection closes here
        await _kv_idle(c)  # the decode left its batch and freed its blocks; kvstore empty
        # A non-streaming request whose client gives up is cancelled the same way.
        async with httpx.AsyncClient(base_url=_base(c)) as http:
            call = asyncio.create_task(http.post("/v1/completions",
                                                 json={**body, "stream": False}))
            end = time.monotonic() + 10
            while sum(d.active for d in await c.decode_stats()) == 0:
                assert time.monotonic() < end and not call.done()
                await asyncio.sleep(0.02)
            call.cancel()  # the client closes its connection mid-request
            with pytest.raises(asyncio.CancelledError):
                await call
        await _kv_idle(c)
