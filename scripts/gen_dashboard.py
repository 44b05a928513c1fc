"""Write the Grafana dashboard compose provisions (compose/observability/grafana/dashboards/
pdserve.json) from the panel list below; tests/unit/test_observability.py checks that the
checked-in JSON is what this writes and that every query names a metric pdserve exports.

  python scripts/gen_dashboard.py            # rewrite
  python scripts/gen_dashboard.py --check    # exit 1 if the checked-in file differs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "compose/observability/grafana/dashboards/" \
    "pdserve.json"
DS = {"type": "prometheus", "uid": "prometheus"}
G = 'group=~"$group"'
W = "$__rate_interval"


def q(expr: str, legend: str) -> dict[str, str]:
    return {"expr": expr, "legendFormat": legend}


def quantiles(metric: str) -> list[dict[str, str]]:
    return [q(f"histogram_quantile({p}, sum by (le, group) (rate({metric}_bucket{{{G}}}[{W}])))",
              f"p{int(p * 100)} {{{{group}}}}") for p in (0.5, 0.9, 0.99)]


# (title, unit, targets, width)
PANELS: list[tuple[str, str, list[dict[str, str]], int]] = [
    ("TTFT percentiles", "s", quantiles("pdserve:time_to_first_token_seconds"), 8),
    ("TPOT (inter-token latency) percentiles", "s",
     quantiles("pdserve:inter_token_latency_seconds"), 8),
    ("End-to-end latency percentiles", "s", quantiles("pdserve:e2e_request_latency_seconds"), 8),
    ("Goodput: requests/s within the TTFT SLO", "reqps", [
        q(f'sum by (group) (rate(pdserve:time_to_first_token_seconds_bucket{{{G}, le="$slo"}}'
          f"[{W}]))", "within {{group}}"),
        q(f"sum by (group) (rate(pdserve:time_to_first_token_seconds_count{{{G}}}[{W}]))",
          "all {{group}}")], 8),
    ("TTFT SLO attainment", "percentunit", [
        q(f'sum by (group) (rate(pdserve:time_to_first_token_seconds_bucket{{{G}, le="$slo"}}'
          f"[{W}])) / sum by (group) (rate(pdserve:time_to_first_token_seconds_count{{{G}}}"
          f"[{W}]))", "{{group}}")], 8),
    ("Requests/s by finish reason", "reqps", [
        q(f"sum by (group, finished_reason) (rate(pdserve:requests_total{{{G}}}[{W}]))",
          "{{group}} {{finished_reason}}")], 8),
    ("Prefill rejections/s by reason, forwards/s, queue waits/s", "reqps", [
        q(f'sum by (group, reason) (rate(pdserve:prefill_admissions_total{{{G}, '
          f'outcome="rejected"}}[{W}]))', "rejected {{group}} {{reason}}"),
        q(f"sum by (group) (rate(pdserve:forwarded_requests_total{{{G}}}[{W}]))",
          "forwarded {{group}}"),
        q(f"sum by (group) (rate(pdserve:queued_requests_total{{{G}}}[{W}]))",
          "queued {{group}}")], 8),
    ("Forwarding-queue depth", "short", [
        q(f"max by (group) (pdserve:forward_queue_depth{{{G}}})", "{{group}}")], 8),
    ("Deadline interventions/s by stage", "reqps", [
        q(f"sum by (group, stage) (rate(pdserve:deadline_exceeded_total{{{G}}}[{W}]))",
          "{{group}} {{stage}}")], 8),
    ("KV transfer rate by hop and transport", "Bps", [
        q(f"sum by (group, hop, transport) (rate(pdserve:kv_transfer_bytes_total{{{G}}}[{W}]))",
          "{{group}} {{hop}} {{transport}}")], 8),
    ("KV handoff time percentiles", "s", quantiles("pdserve:kv_transfer_seconds"), 8),
    ("KV fallbacks/s (negotiated transport failed, tcp carried it)", "reqps", [
        q(f"sum by (group) (rate(pdserve:kv_fallbacks_total{{{G}}}[{W}]))", "{{group}}"),
        q(f"sum by (group, role) (rate(pdserve:kv_transfer_fallbacks_total{{{G}}}[{W}]))",
          "client {{role}} {{group}}")], 8),
    ("Prefill busy slots / slots", "short", [
        q(f"sum by (group) (pdserve:prefill_busy_slots{{{G}}})", "busy {{group}}"),
        q(f"sum by (group) (pdserve:prefill_slots{{{G}}})", "slots {{group}}")], 8),
    ("Decode batch size and paged pool blocks in use", "short", [
        q(f"sum by (group) (pdserve:decode_batch_size{{{G}}})", "batch {{group}}"),
        q(f"sum by (group) (pdserve:paged_blocks_in_use{{{G}}})", "blocks in use {{group}}"),
        q(f"sum by (group) (pdserve:paged_pool_blocks{{{G}}})", "pool blocks {{group}}")], 8),
    ("Open streams (gateways) and KV staged in the kvstore", "short", [
        q("sum by (instance_id) (pdserve:open_streams)", "open streams {{instance_id}}"),
        q("sum by (instance_id) (pdserve:kv_staged_entries)", "staged {{instance_id}}")], 8),
    ("KV bytes staged in the kvstore", "bytes", [
        q("sum by (instance_id) (pdserve:kv_staged_bytes)", "{{instance_id}}"),
        q("sum by (instance_id) (pdserve:kv_capacity_bytes)", "capacity {{instance_id}}")], 8),
    ("Prefix cache: hit ratio and bytes", "percentunit", [
        q(f"sum by (group) (rate(pdserve:prefix_cache_hits_total{{{G}}}[{W}])) / "
          f"sum by (group) (rate(pdserve:prefix_cache_lookups_total{{{G}}}[{W}]))",
          "hit ratio {{group}}")], 8),
    ("Tokens/s (prompt and generated)", "short", [
        q(f"sum by (group) (rate(pdserve:prompt_tokens_total{{{G}}}[{W}]))", "prompt {{group}}"),
        q(f"sum by (group) (rate(pdserve:generation_tokens_total{{{G}}}[{W}]))",
          "generated {{group}}")], 8),
]


def dashboard() -> dict[str, Any]:
    panels = []
    x = y = 0
    for i, (title, unit, targets, width) in enumerate(PANELS):
        if x + width > 24:
            x, y = 0, y + 8
        panels.append({
            "id": i + 1, "type": "timeseries", "title": title, "datasource": DS,
            "gridPos": {"x": x, "y": y, "w": width, "h": 8},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"},
                        "tooltip": {"mode": "multi"}},
            "targets": [{**t, "refId": chr(ord("A") + j), "datasource": DS}
                        for j, t in enumerate(targets)]})
        x += width
    slo_options = ["0.25", "0.5", "1.0", "2.5", "5.0", "10.0"]
    return {
        "uid": "pdserve", "title": "pdserve", "tags": ["pdserve"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "editable": False, "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": [
            {"name": "group", "label": "scenario group", "type": "query", "datasource": DS,
             "query": {"query": "label_values(pdserve:requests_total, group)",
                       "refId": "groups"},
             "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2,
             "current": {"text": "All", "value": "$__all"}},
            {"name": "slo", "label": "TTFT SLO (s, a histogram bucket)", "type": "custom",
             "query": ",".join(slo_options), "current": {"text": "1.0", "value": "1.0"},
             "options": [{"text": o, "value": o, "selected": o == "1.0"}
                         for o in slo_options]},
        ]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="only compare with the checked-in file")
    args = ap.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python scripts/gen_dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
