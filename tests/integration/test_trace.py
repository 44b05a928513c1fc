"""One request gives one trace across gateway, prefill, kvstore and decode."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.cluster import Cluster

pytestmark = pytest.mark.integration


async def test_one_request_one_trace(cluster: Cluster, spans: InMemorySpanExporter) -> None:
    await cluster.generate(prompt="trace me", max_tokens=5, request_id="trace-1")
    finished = spans.get_finished_spans()
    root = next(s for s in finished if s.name == "gateway.generate"
                and s.attributes.get("pdserve.client_request_id") == "trace-1")
    trace_id = root.context.trace_id
    in_trace = {s.name for s in finished if s.context.trace_id == trace_id}
    expected = {
        "/pdserve.v1.GenerationService/Generate",
        "/pdserve.v1.PrefillService/Prefill",
        "/pdserve.v1.KvStoreService/ReserveKv",
        "/pdserve.v1.DecodeService/Decode",
        "prefill.compute", "kv.push", "kv.fetch", "decode.loop", "kvstore.reserve",
    }
    assert expected <= in_trace, f"missing from the trace: {expected - in_trace}"
    # Server spans are children of their client spans (context went through gRPC metadata).
    by_id = {s.context.span_id: s for s in finished}
    decode_server = next(s for s in finished if s.context.trace_id == trace_id
                         and s.name == "/pdserve.v1.DecodeService/Decode"
                         and s.kind.name == "SERVER")
    assert decode_server.parent is not None
    assert by_id[decode_server.parent.span_id].kind.name == "CLIENT"
