"""The front door of a live `pdserve up --model tiny`, with TLS (a self-signed
certificate made here), an API key and reflection off: the openai client, curl -N, the
CLI over HTTP, gRPC with TLS + key, refusals without a key, and a Prometheus scrape of
every process (names, bounded labels, counts moving with the traffic, promtool)."""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from pdserve.v1 import generation_service_pb2 as gen_pb
from pdserve.v1 import generation_service_pb2_grpc as gen_grpc
from services.observe.metrics import PREFIX
from tests.certs import make_ca
from tests.e2e.conftest import UpProcess, start_up

pytestmark = pytest.mark.e2e

KEY = "sk-test-123"
PROMPT = "What is the capital of France?"


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost/127.0.0.1 (its own CA), made here."""
    pem, _, _ = make_ca(directory, "pdserve-door")
    return pem.cert, pem.key


class Door:
    def __init__(self, up: UpProcess, cert: Path) -> None:
        self.up = up
        self.cert = cert
        out = up.output()
        m = re.search(r"OpenAI-compatible HTTP on (\S+)/v1", out)
        assert m, out
        self.http = m.group(1)
        self.metrics = dict(re.findall(r"^  (\S+)\s+(http://\S+/metrics)$", out, re.M))

    def channel(self) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(self.cert.read_bytes())
        return grpc.secure_channel(self.up.address, creds)

    def grpc_text(self, **kw: object) -> tuple[list[int], str]:
        with self.channel() as ch:
            ids: list[int] = []
            text = ""
            for msg in gen_grpc.GenerationServiceStub(ch).Generate(
                    gen_pb.GenerateRequest(**kw), timeout=60,  # type: ignore[arg-type]
                    metadata=[("authorization", f"Bearer {KEY}")]):
                ids.extend(msg.token_ids)
                text += msg.text
            return ids, text


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Door]:
    tmp = tmp_path_factory.mktemp("door")
    cert, key = make_cert(tmp)
    up = start_up(tmp / "up", "--model", "tiny", "--tls-cert", str(cert), "--tls-key",
                  str(key), "--api-key", KEY, "--no-reflection")
    try:
        yield Door(up, cert)
    finally:
        up.stop()


def test_openai_client_over_tls_matches_grpc(door: Door) -> None:
    ids, want = door.grpc_text(prompt=PROMPT, use_chat_template=True, max_tokens=20)
    with httpx.Client(verify=ssl.create_default_context(cafile=str(door.cert))) as http:
        client = openai.OpenAI(base_url=door.http + "/v1", api_key=KEY, http_client=http,
                               max_retries=0)
        stream = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": PROMPT}], temperature=0,
            max_tokens=20, stream=True, stream_options={"include_usage": True})
        text, usage = "", None
        for chunk in stream:
            usage = chunk.usage or usage
            text += "".join(c.delta.content or "" for c in chunk.choices)
        assert text == want
        assert usage is not None and usage.completion_tokens == len(ids)

        bad = openai.OpenAI(base_url=door.http + "/v1", api_key="wrong", http_client=http,
                            max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        assert http.post(door.http + "/v1/completions", json={"prompt": "x"}).status_code == 401
        assert http.get(door.http + "/health").status_code == 200


def test_curl_shows_sse(door: Door) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    body = json.dumps({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8,
                       "temperature": 0, "stream": True})
    out = subprocess.run(
        [curl, "-sS", "-N", "--cacert", str(door.cert), door.http + "/v1/chat/completions",
         "-H", "Content-Type: application/json", "-H", f"Authorization: Bearer {KEY}",
         "-d", body], capture_output=True, text=True, timeout=60, check=True).stdout
    events = [ln for ln in out.splitlines() if ln]
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0].removeprefix("data: "))
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"]["role"] == "assistant"


def test_cli_generate_over_http(door: Door) -> None:
    _, want = door.grpc_text(prompt=PROMPT, use_chat_template=True, max_tokens=12)
    env = {**os.environ, "PDSERVE_API_KEY": KEY}
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "generate", PROMPT, "--max-tokens", "12",
         "--http", door.http, "--tls-ca", str(door.cert)],
        capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == want.strip()
    grpc_out = subprocess.run(
        [sys.executable, "-m", "services.cli", "generate", PROMPT, "--max-tokens", "12",
         "--address", door.up.address, "--tls-ca", str(door.cert)],
        capture_output=True, text=True, timeout=60, env=env)
    assert grpc_out.returncode == 0, grpc_out.stderr
    assert grpc_out.stdout.strip() == want.strip()


def test_grpc_key_and_reflection(door: Door) -> None:
    req = gen_pb.GenerateRequest(prompt="hi", max_tokens=2)
    with door.channel() as ch:
        stub = gen_grpc.GenerationServiceStub(ch)
        for metadata in (None, [("authorization", "Bearer nope")]):
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(req, timeout=30, metadata=metadata))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
                list_services="")]), timeout=10, metadata=[("authorization", f"Bearer {KEY}")]))
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # Plaintext gRPC against the TLS port fails; it never reaches the service.
    with grpc.insecure_channel(door.up.address) as ch, pytest.raises(grpc.RpcError):
        list(gen_grpc.GenerationServiceStub(ch).Generate(req, timeout=5))


def _scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _sum(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    return sum(v for _, v in samples.get(name, []))


def test_prometheus_scrape_of_every_process(door: Door) -> None:
    assert {"gateway", "kvstore", "prefill-0", "decode-0"} <= set(door.metrics), door.metrics
    before = _scrape(door.metrics["gateway"])
    n = 3
    for i in range(n):
        door.grpc_text(prompt_token_ids=[7 + i] * 10, max_tokens=4)
    gw = _scrape(door.metrics["gateway"])
    for name, moved in [("time_to_first_token_seconds_count", n),
                        ("e2e_request_latency_seconds_count", n),
                        ("inter_token_latency_seconds_count", 3 * n),
                        ("kv_transfer_seconds_count", n), ("generation_tokens_total", 4 * n)]:
        assert _sum(gw, PREFIX + name) - _sum(before, PREFIX + name) == moved, name
    stop = [lab for lab, _ in gw[PREFIX + "requests_total"]]
    assert all(set(lab) == {"role", "group", "instance_id", "finished_reason"} for lab in stop)
    want = {"prefill-0": ["prefill_busy_slots", "prefill_slots", "kv_transfers_total"],
            "decode-0": ["decode_batch_size", "paged_blocks_in_use", "paged_pool_blocks"],
            "kvstore": ["kv_staged_bytes", "kv_capacity_bytes"]}
    for proc, names in want.items():
        samples = _scrape(door.metrics[proc])
        for name in names:
            assert PREFIX + name in samples, (proc, name)
    assert _sum(_scrape(door.metrics["kvstore"]), PREFIX + "kv_staged_bytes") == 0

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian package prometheus) is not installed")
    for url in door.metrics.values():
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read()
        res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                             timeout=30)
        # rc 1: the exposition does not parse; rc 3: lint findings. The one finding we
        # accept is the "name:with_colon" convention vLLM and SGLang use (pdserve:...).
        problems = [ln for ln in res.stderr.decode().splitlines()
                    if ln and not ln.endswith("metric names should not contain ':'")]
        assert res.returncode in (0, 3) and not problems, (url, res.stderr.decode())


def test_plain_http_is_refused_on_the_tls_port(door: Door) -> None:
    plain = door.http.replace("https://", "http://")
    with pytest.raises((httpx.HTTPError, ssl.SSLError)):
        httpx.get(plain + "/health", timeout=5)
