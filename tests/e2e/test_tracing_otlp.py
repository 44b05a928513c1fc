"""Tracing end to end without Docker: the real `pdserve up` processes export OTLP/gRPC to a
receiver in this test (opentelemetry-proto's TraceService), and each request is one
trace that spans gateway, prefill, kvstore and decode, over gRPC and over HTTP."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from pdserve.v1 import generation_service_pb2 as gen_pb
from pdserve.v1 import generation_service_pb2_grpc as gen_grpc
from tests.e2e.conftest import UpProcess, start_up

pytestmark = pytest.mark.e2e

ROLES = {"pdserve-gateway", "pdserve-prefill", "pdserve-kvstore", "pdserve-decode"}


@dataclass
class Span:
    service: str
    trace_id: str
    name: str
    attrs: dict[str, str]


@dataclass
class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    spans: list[Span] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        got = []
        for rs in request.resource_spans:
            service = next((a.value.string_value for a in rs.resource.attributes
                            if a.key == "service.name"), "")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    attrs = {a.key: a.value.string_value for a in s.attributes}
                    got.append(Span(service, s.trace_id.hex(), s.name, attrs))
        with self.lock:
            self.spans.extend(got)
        return trace_service_pb2.ExportTraceServiceResponse()

    def snapshot(self) -> list[Span]:
        with self.lock:
            return list(self.spans)


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[UpProcess, Receiver]]:
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
           "OTEL_EXPORTER_OTLP_INSECURE": "true", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # start_up hands its environment to pdserve up's children
    try:
        up = start_up(tmp_path_factory.mktemp("traced"), "--model", "tiny")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        yield up, receiver
    finally:
        up.stop()
        server.stop(0)


def _trace_of(receiver: Receiver, client_rid: str, within_s: float = 30.0) -> set[str]:
    """The services in the one trace of the request labelled ``client_rid``, once every
    role has exported its part."""
    end = time.monotonic() + within_s
    while True:
        spans = receiver.snapshot()
        roots = [s for s in spans if s.attrs.get("pdserve.client_request_id") == client_rid]
        if roots:
            assert len({s.trace_id for s in roots}) == 1, roots
            services = {s.service for s in spans if s.trace_id == roots[0].trace_id}
            if ROLES <= services or time.monotonic() > end:
                return services
        assert time.monotonic() < end, f"no span of {client_rid} arrived"
        time.sleep(0.2)


def test_one_trace_per_request_across_every_role(
        traced: tuple[UpProcess, Receiver]) -> None:
    up, receiver = traced
    with grpc.insecure_channel(up.address) as ch:
        stub = gen_grpc.GenerationServiceStub(ch)
        for rid in ("trace-a", "trace-b"):
            list(stub.Generate(gen_pb.GenerateRequest(
                prompt_token_ids=[11] * 12, max_tokens=4, request_id=rid), timeout=60))
    # The HTTP door continues the caller's W3C trace context.
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    base = up.output().split("OpenAI-compatible HTTP on ")[1].split("/v1")[0]
    r = httpx.post(base + "/v1/completions", json={
        "prompt": [11] * 12, "max_tokens": 4, "request_id": "trace-http"},
        headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}, timeout=60)
    assert r.status_code == 200, r.text

    traces = {}
    for rid in ("trace-a", "trace-b", "trace-http"):
        services = _trace_of(receiver, rid)
        assert ROLES <= services, (rid, services)
        traces[rid] = next(s.trace_id for s in receiver.snapshot()
                           if s.attrs.get("pdserve.client_request_id") == rid)
    assert len(set(traces.values())) == 3  # one trace per request, not one per process
    assert traces["trace-http"] == trace_id
