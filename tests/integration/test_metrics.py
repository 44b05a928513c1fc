"""Prometheus metrics of an in-process cluster: every role's /metrics server answers,
the documented names are there with bounded labels, and the counts follow the traffic."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.observe.metrics import PREFIX, SCRAPED
from tests.cluster import Cluster

pytestmark = pytest.mark.integration

ALLOWED_LABELS = {"role", "group", "instance_id", "finished_reason", "outcome", "reason",
                  "transport", "hop", "stage", "le"}


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


async def test_metrics_move_with_traffic(redis_url: str) -> None:
    async with Cluster(redis_url, prefills=2, decodes=1) as c:
        rt = c.gateway_nodes[0][0]
        urls = [rt.metrics_url, c.kvstore.runtime.metrics_url,
                *(n[0].metrics_url for n in c.prefill_nodes),
                *(n[0].metrics_url for n in c.decode_nodes)]
        assert all(u.startswith("http://") for u in urls)
        before = scrape(urls[0])
        n = 3
        for i in range(n):
            await c.generate(prompt_token_ids=[5 + i] * 12, max_tokens=6)
        after = scrape(urls[0])
        g = {"group": c.group, "instance_id": rt.instance_id}

        def moved(name: str, **labels: str) -> float:
            return total(after, name, **g, **labels) - total(before, name, **g, **labels)

        assert moved(PREFIX + "time_to_first_token_seconds_count") == n
        assert moved(PREFIX + "e2e_request_latency_seconds_count") == n
        assert moved(PREFIX + "inter_token_latency_seconds_count") == n * 5
        assert moved(PREFIX + "requests_total") == n
        assert moved(PREFIX + "generation_tokens_total") == n * 6
        assert moved(PREFIX + "prompt_tokens_total") == n * 12
        assert moved(PREFIX + "prefill_admissions_total", outcome="accepted") == n
        assert moved(PREFIX + "kv_transfer_seconds_count") == n
        assert moved(PREFIX + "kv_transfer_bytes_total", hop="push") > 0

        # Every process serves the same names for its own role (one registry in-process,
        # so any URL shows all instances; each role's series carry its labels).
        for url in urls:
            samples = scrape(url)
            for (name, labels), _ in samples.items():
                if name.startswith(PREFIX):
                    assert {k for k, _ in labels} <= ALLOWED_LABELS, (name, labels)
        roles = {dict(lab).get("role") for (name, lab) in after if name.startswith(PREFIX)}
        assert {"gateway", "prefill", "decode", "kvstore"} <= roles
        for name in ("decode_batch_size", "paged_blocks_in_use", "paged_pool_blocks",
                     "kv_staged_bytes", "prefill_busy_slots", "open_streams"):
            assert PREFIX + name in SCRAPED
            assert any(n == PREFIX + name for n, _ in after), name
        assert total(after, PREFIX + "kv_staged_bytes", group=c.group) == 0
        assert total(after, PREFIX + "kv_transfers_total", role="prefill") >= n
