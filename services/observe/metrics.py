"""Prometheus metrics for every pdserve process, and the /metrics HTTP server.

Names follow vLLM and SGLang with the ``pdserve:`` prefix (vLLM's
``vllm:time_to_first_token_seconds`` is our ``pdserve:time_to_first_token_seconds``).
Every series carries only bounded labels: ``role``, ``group`` and ``instance_id`` (not
``instance``: Prometheus sets that one on every scraped series to the target address),
plus a closed set per metric (``finished_reason``, ``outcome``/``reason``, ``transport``,
``hop``, ``stage``). Never a request id.

Two kinds of metric live here:
  * request metrics (histograms and counters) that the gateway updates as requests
    end: ``RequestMetrics``;
  * state read at scrape time from each service's own counters (decode batch, paged
    pool, prefix cache, kvstore bytes, KV transfers): a service registers a callback
    with ``register_source`` and returns ``{metric name: value}`` from the table
    ``SCRAPED``; one collector turns all sources of the process into families.

``serve_metrics`` runs prometheus_client's HTTP server (a daemon thread) on the port
``ServiceConfig.metrics_port`` names; ``ServiceRuntime`` starts and stops it.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

PREFIX = "pdserve:"
BASE_LABELS = ("role", "group", "instance_id")

# Latency buckets: vLLM's, with sub-millisecond steps added for the mock engine.
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
               40.0, 50.0, 60.0, 120.0, 240.0, 480.0)
KV_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# --- request metrics (the gateway observes them when a request ends) --------------------
TTFT = Histogram(PREFIX + "time_to_first_token_seconds",
                 "Time from the request's arrival at the gateway to its first token.",
                 BASE_LABELS, buckets=TTFT_BUCKETS)
ITL = Histogram(PREFIX + "inter_token_latency_seconds",
                "Gap between consecutive output tokens as the gateway relays them.",
                BASE_LABELS, buckets=ITL_BUCKETS)
E2E = Histogram(PREFIX + "e2e_request_latency_seconds",
                "Time from arrival to the last token (or the error).", BASE_LABELS,
                buckets=E2E_BUCKETS)
QUEUE_TIME = Histogram(PREFIX + "request_queue_time_seconds",
                       "Time from arrival until a prefill accepted the request.",
                       BASE_LABELS, buckets=TTFT_BUCKETS)
KV_TRANSFER = Histogram(PREFIX + "kv_transfer_seconds",
                        "KV handoff per request: staging at the kvstore plus the decode's fetch.",
                        (*BASE_LABELS, "transport"), buckets=KV_BUCKETS)
REQUESTS = Counter(PREFIX + "requests",
                   "Requests ended, by finish reason (stop, length, error, abort, deadline).",
                   (*BASE_LABELS, "finished_reason"))
PROMPT_TOKENS = Counter(PREFIX + "prompt_tokens", "Prompt tokens of requests that got a token.",
                        BASE_LABELS)
GENERATION_TOKENS = Counter(PREFIX + "generation_tokens", "Output tokens relayed to clients.",
                            BASE_LABELS)
ADMISSIONS = Counter(PREFIX + "prefill_admissions",
                     "Prefill answers to the gateway's admission asks: accepted, or rejected "
                     "with the prefill's reason (slots_full, kv_capacity, draining, deadline).",
                     (*BASE_LABELS, "outcome", "reason"))
FORWARDS = Counter(PREFIX + "forwarded_requests",
                   "Requests admitted by a prefill other than the first one asked.", BASE_LABELS)
QUEUE_WAITS = Counter(PREFIX + "queued_requests",
                      "Requests that waited in the group's forwarding queue.", BASE_LABELS)
DEADLINES = Counter(PREFIX + "deadline_exceeded",
                    "Requests the gateway ended because a deadline passed, by stage "
                    "(ttft: before the first token, handoff, decode).", (*BASE_LABELS, "stage"))
KV_BYTES = Counter(PREFIX + "kv_transfer_bytes",
                   "KV bytes moved per hop (push: prefill to kvstore, fetch: kvstore to "
                   "decode) by transport.", (*BASE_LABELS, "hop", "transport"))
KV_FALLBACKS = Counter(PREFIX + "kv_fallbacks",
                       "Requests whose KV fell back to tcp after the negotiated transport failed.",
                       BASE_LABELS)

# --- state read at scrape time: name -> (kind, help) ------------------------------------
SCRAPED: dict[str, tuple[str, str]] = {
    PREFIX + "open_streams": ("gauge", "Streams this gateway holds open to workers."),
    PREFIX + "forward_queue_depth": ("gauge", "Requests waiting in the group's forwarding "
                                     "queue (shared by every gateway)."),
    PREFIX + "prefill_busy_slots": ("gauge", "Prefill batch slots in use (b_p)."),
    PREFIX + "prefill_slots": ("gauge", "Prefill batch slots (b_p)."),
    PREFIX + "prefill_queued": ("gauge", "Requests waiting at the prefill (queueing "
                                "baselines only; forward keeps no local queue)."),
    PREFIX + "prefix_cache_lookups": ("counter", "Prefix-cache lookups."),
    PREFIX + "prefix_cache_hits": ("counter", "Prefills that reused cached prefix KV."),
    PREFIX + "prefix_cache_saved_tokens": ("counter", "Prompt tokens not recomputed thanks to "
                                           "the prefix cache."),
    PREFIX + "prefix_cache_bytes": ("gauge", "Bytes of KV held by the prefix cache."),
    PREFIX + "decode_batch_size": ("gauge", "Requests in the decode's continuous batch."),
    PREFIX + "decode_slots": ("gauge", "Decode batch slots (b_d)."),
    PREFIX + "paged_blocks_in_use": ("gauge", "Paged KV pool blocks held by requests."),
    PREFIX + "paged_pool_blocks": ("gauge", "Blocks in the paged KV pool (its size)."),
    PREFIX + "paged_bytes_in_use": ("gauge", "Bytes of the paged KV pool held by requests."),
    PREFIX + "kv_staged_bytes": ("gauge", "KV bytes staged in the kvstore (reserved or "
                                 "written, not yet consumed or released)."),
    PREFIX + "kv_staged_entries": ("gauge", "Requests whose KV the kvstore holds."),
    PREFIX + "kv_capacity_bytes": ("gauge", "The kvstore's capacity."),
    PREFIX + "kvstore_bytes_in": ("counter", "KV bytes written into the kvstore."),
    PREFIX + "kvstore_bytes_out": ("counter", "KV bytes read out of the kvstore."),
    PREFIX + "kv_transfers": ("counter", "KV transfers this process made as a data-plane "
                              "client."),
    PREFIX + "kv_transfer_fallbacks": ("counter", "Transfers that fell back to tcp."),
    PREFIX + "kv_transfer_failures": ("counter", "Transfers that failed outright."),
}

# A source returns {name: value}, or {name: {group: value}} for a per-group series.
Source = Callable[[], Mapping[str, float | Mapping[str, float]]]


@dataclass(frozen=True)
class Labels:
    role: str
    group: str
    instance_id: str

    def values(self, group: str | None = None) -> tuple[str, str, str]:
        return self.role, group or self.group, self.instance_id


class _ScrapeCollector(Collector):
    """One collector per process for every registered source (prometheus_client refuses
    two collectors that expose the same family name)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._sources: dict[int, tuple[Labels, Source]] = {}

    def add(self, labels: Labels, fn: Source) -> int:
        with self._lock:
            key = next(self._ids)
            self._sources[key] = (labels, fn)
            return key

    def remove(self, key: int) -> None:
        with self._lock:
            self._sources.pop(key, None)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            sources = list(self._sources.values())
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for labels, fn in sources:
            try:
                values = dict(fn())
            except Exception:  # a scrape must not fail because one source did
                log.exception("metrics source of %s failed", labels.instance_id)
                continue
            for name, value in values.items():
                kind, help_ = SCRAPED[name]
                fam = families.get(name)
                if fam is None:
                    cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                    fam = families[name] = cls(name, help_, labels=BASE_LABELS)
                if isinstance(value, Mapping):
                    for group, v in value.items():
                        fam.add_metric(labels.values(group), float(v))
                else:
                    fam.add_metric(labels.values(), float(value))
        yield from families.values()

    def describe(self) -> Iterable[Metric]:
        return []  # dynamic: nothing to check for duplicates at registration


_SCRAPE = _ScrapeCollector()
REGISTRY.register(_SCRAPE)


def register_source(labels: Labels, fn: Source) -> Callable[[], None]:
    """Export ``fn()``'s values (keys from ``SCRAPED``) at every scrape; returns the
    function that unregisters it (a stopped in-process service must stop reporting)."""
    unknown = set(fn()) - set(SCRAPED)
    if unknown:
        raise ValueError(f"metric names not declared in SCRAPED: {sorted(unknown)}")
    key = _SCRAPE.add(labels, fn)
    return lambda: _SCRAPE.remove(key)


# A service's registry load record (what it reports every heartbeat) -> metrics, per role:
# every service exports its state without code of its own (ServiceRuntime.serving).
_LOAD_NAMES: dict[str, dict[str, str]] = {
    "*": {"kv_transfers": "kv_transfers", "kv_fallbacks": "kv_transfer_fallbacks",
          "kv_transfer_failures": "kv_transfer_failures"},
    "prefill": {"busy": "prefill_busy_slots", "slots": "prefill_slots",
                "queued": "prefill_queued", "prefix_lookups": "prefix_cache_lookups",
                "prefix_hits": "prefix_cache_hits", "prefix_bytes": "prefix_cache_bytes",
                "prefix_saved_tokens": "prefix_cache_saved_tokens"},
    "decode": {"active": "decode_batch_size", "slots": "decode_slots",
               "kv_blocks_total": "paged_pool_blocks", "kv_bytes_held": "paged_bytes_in_use"},
    "kvstore": {"bytes_held": "kv_staged_bytes", "entries": "kv_staged_entries",
                "capacity_bytes": "kv_capacity_bytes"},
}


def from_load(role: str, load: Mapping[str, float]) -> dict[str, float]:
    """The metrics in one load record (unknown keys are ignored: the load record is the
    scheduler's contract, the metric names are the operators')."""
    names = {**_LOAD_NAMES["*"], **_LOAD_NAMES.get(role, {})}
    out = {PREFIX + names[k]: float(v) for k, v in load.items() if k in names}
    if role == "decode" and "kv_blocks_total" in load:
        out[PREFIX + "paged_blocks_in_use"] = float(
            load["kv_blocks_total"] - load.get("kv_blocks_free", 0.0))
    return out


class MetricsServer:
    """prometheus_client's /metrics HTTP server on a daemon thread."""

    def __init__(self, host: str, port: int) -> None:
        self._server, self._thread = start_http_server(port, addr=host)
        self.port = int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(host: str, port: int) -> MetricsServer:
    return MetricsServer(host, port)


def _reason_name(reason: str) -> str:
    return reason.lower().removeprefix("reject_reason_") or "unspecified"


class RequestMetrics:
    """The gateway's per-request observations, labelled with its role and instance."""

    def __init__(self, labels: Labels) -> None:
        self.labels = labels

    def _l(self, group: str) -> tuple[str, str, str]:
        return self.labels.values(group)

    def finished(self, group: str, reason: str, *, ttft_s: float | None = None,
                 token_times: list[float] | None = None, e2e_s: float,
                 prompt_tokens: int = 0, queue_s: float | None = None) -> None:
        lv = self._l(group)
        REQUESTS.labels(*lv, reason).inc()
        E2E.labels(*lv).observe(e2e_s)
        if ttft_s is not None:
            TTFT.labels(*lv).observe(ttft_s)
            PROMPT_TOKENS.labels(*lv).inc(prompt_tokens)
        if queue_s is not None:
            QUEUE_TIME.labels(*lv).observe(queue_s)
        if token_times:
            GENERATION_TOKENS.labels(*lv).inc(len(token_times))
            itl = ITL.labels(*lv)
            for a, b in itertools.pairwise(token_times):
                itl.observe(b - a)

    def kv(self, group: str, seconds: float, push: str, fetch: str, nbytes: int,
           fallback: bool) -> None:
        lv = self._l(group)
        KV_TRANSFER.labels(*lv, fetch if fetch and fetch != push else push).observe(seconds)
        if nbytes:
            KV_BYTES.labels(*lv, "push", push or "unknown").inc(nbytes)
            if fetch:
                KV_BYTES.labels(*lv, "fetch", fetch).inc(nbytes)
        if fallback:
            KV_FALLBACKS.labels(*lv).inc()

    def admission(self, group: str, accepted: bool, reason: str = "") -> None:
        ADMISSIONS.labels(*self._l(group), "accepted" if accepted else "rejected",
                          "" if accepted else _reason_name(reason)).inc()

    def forwarded(self, group: str) -> None:
        FORWARDS.labels(*self._l(group)).inc()

    def queued(self, group: str) -> None:
        QUEUE_WAITS.labels(*self._l(group)).inc()

    def deadline(self, group: str, stage: str) -> None:
        DEADLINES.labels(*self._l(group), stage).inc()
