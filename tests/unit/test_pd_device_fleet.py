"""The fleet bench's pure parts: workloads, the capacity search, the gain arithmetic."""

from __future__ import annotations

import statistics

import pytest

from bench.pd_device_fleet import (
    Chat,
    ChatResult,
    Probe,
    capacity,
    cloud_capacity,
    workloads,
)
from bench.traces import AZURE_CODE

pytestmark = pytest.mark.unit


def test_workloads_keep_the_trace_prompts_and_give_chat_length_answers() -> None:
    w = workloads(str(AZURE_CODE), 100, 8192, 256, 2048, 256)
    assert len(w["trace"]) == len(w["chat"]) == 100
    assert all(c.prompt_len <= 2048 for c in w["chat"])
    assert all(32 <= c.out_len <= 1024 for c in w["chat"])
    assert 180 <= statistics.median(c.out_len for c in w["chat"]) <= 340  # median ~256
    assert statistics.median(c.out_len for c in w["trace"]) < 40  # the code trace's own
    assert w == workloads(str(AZURE_CODE), 100, 8192, 256, 2048, 256)  # seeded


def fake(attainment: dict[int, float]):  # type: ignore[no-untyped-def]
    def run(n: int) -> Probe:
        p = Probe("x", n)
        p.attainment = attainment.get(n, 0.0)
        return p
    return run


def test_capacity_search_survives_a_noisy_small_probe_and_bisects() -> None:
    att = {1: 0.7, 2: 1.0, 4: 1.0, 8: 0.9, 16: 0.6, 32: 0.2, 12: 0.85, 14: 0.7}
    best, probes = capacity(fake(att), 40, 0.8)
    assert best is not None and best.devices == 12
    assert [p.devices for p in probes] == [1, 2, 4, 8, 16, 32, 12, 14]
    best, _ = capacity(fake({}), 40, 0.8)  # nothing passes
    assert best is None
    best, probes = capacity(fake({n: 1.0 for n in range(1, 9)}), 8, 0.8)  # all pass
    assert best is not None and best.devices == 8 and len(probes) == 4


def test_cloud_throughput_gain_is_the_tighter_pool_of_slots_over_slot_seconds() -> None:
    # cloud_only: decode holds 2.4 s a chat -> 2 / 2.4 chats/s; pd_device: the prefill
    # (0.1 s) is tighter than its decode (0.08 s) -> 2 / 0.1. The device's view (busy
    # 2500 / 250 ms, queueing included) is reported beside it.
    res = {"at_capacity": {
        "cloud_only": {"devices": 3, "chats_per_s": 0.35, "cloud_busy_ms": 2500.0,
                       "cloud_prefill_slot_ms": 90.0, "cloud_decode_slot_ms": 2400.0},
        "pd_device": {"devices": 8, "chats_per_s": 0.55, "cloud_busy_ms": 250.0,
                      "cloud_prefill_slot_ms": 100.0, "cloud_decode_slot_ms": 80.0}}}
    cloud_capacity(res, slots=2)
    assert res["cloud_throughput_gain"] == pytest.approx(24.0)
    assert res["cloud_throughput_gain_at_capacity"] == pytest.approx(24.0)
    assert res["device_view_gain"] == pytest.approx(10.0)
    assert res["at_capacity"]["cloud_only"]["cloud_capacity_chats_per_s"] == \
        pytest.approx(2 / 2.4)
    assert res["at_capacity"]["pd_device"]["slot_utilisation"]["prefill"] == \
        pytest.approx(0.55 * 0.1 / 2)
    assert res["live_chats_per_s_gain"] == pytest.approx(0.55 / 0.35)
    assert res["devices_gain"] == pytest.approx(8 / 3)


def test_a_chat_meets_its_targets_only_when_complete_on_time_and_smooth() -> None:
    def chat(**kw: object) -> ChatResult:
        base = dict(chat=Chat(100, 10), mode="pd_device", planned="pd_device", start_s=0.0,
                    end_s=1.0, ttft_ms=200.0, gaps=[40.0] * 9, tokens=10, fallback="",
                    busy_ms=100.0, device=0)
        return ChatResult(**{**base, **kw})  # type: ignore[arg-type]

    assert chat().meets(1500, 50)
    assert not chat(ttft_ms=1600.0).meets(1500, 50)
    assert not chat(gaps=[40.0] * 8 + [60.0]).meets(1500, 50)
    assert not chat(tokens=9).meets(1500, 50)
    assert not chat(fallback="cloud UNAVAILABLE").meets(1500, 50)


def test_the_gain_comes_from_the_paired_cost_probe_when_there_is_one() -> None:
    # Both modes served the same chats in the cost probe: cloud_only's decode held 3 s a
    # chat, pd_device's prefill 0.05 s (its tighter pool) -> 2 / 3 vs 2 / 0.05 = 60x,
    # while the capacity probes (other chats) say 24x.
    res = {"at_capacity": {
        "cloud_only": {"devices": 3, "chats_per_s": 0.35, "cloud_busy_ms": 2500.0,
                       "cloud_prefill_slot_ms": 90.0, "cloud_decode_slot_ms": 2400.0},
        "pd_device": {"devices": 8, "chats_per_s": 0.55, "cloud_busy_ms": 250.0,
                      "cloud_prefill_slot_ms": 100.0, "cloud_decode_slot_ms": 80.0}},
        "cost": {"cloud_only": {"cloud_busy_ms": 3100.0, "cloud_prefill_slot_ms": 40.0,
                                "cloud_decode_slot_ms": 3000.0},
                 "pd_device": {"cloud_busy_ms": 200.0, "cloud_prefill_slot_ms": 50.0,
                               "cloud_decode_slot_ms": 30.0}}}
    cloud_capacity(res, slots=2)
    assert res["cloud_throughput_gain"] == pytest.approx(60.0)
    assert res["cloud_throughput_gain_at_capacity"] == pytest.approx(24.0)
    assert res["busy_per_request_ms"]["pd_device"]["prefill_slot"] == 50.0
