"""Generates deploy/grafana/dashboards/ncf-stream.json (run it after editing PANELS).

    python deploy/grafana/dashboard.py

The panels live here as data, so the PromQL is in one readable list; a test
checks the JSON is current and that every expression returns data from a real
Prometheus scraping a real daemon.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "ncf-stream.json"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}

# (title, unit, [(PromQL, legend)])
PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Ingest rate", "ops", [
        ("sum(rate(ncf_stream_events_consumed_total[1m]))", "consumed/s"),
        ("sum(rate(ncf_stream_events_trained_total[1m]))", "trained/s")]),
    ("Consumer lag", "short", [("ncf_stream_consumer_lag", "records behind")]),
    ("Dead letters by reason", "ops", [
        ("sum by (reason) (rate(ncf_stream_events_rejected_total[5m]))", "{{reason}}")]),
    ("Training rate", "ops", [
        ("rate(ncf_stream_train_samples_total[1m])", "samples/s"),
        ("rate(ncf_stream_replayed_positives_total[1m])", "replayed positives/s")]),
    ("Training loss", "short", [("ncf_stream_train_loss", "BCE")]),
    ("HR@K, sampled vs full", "percentunit", [
        ("ncf_stream_eval_hit_ratio", "HR@{{k}} {{kind}}")]),
    ("NDCG@K, sampled vs full", "percentunit", [
        ("ncf_stream_eval_ndcg", "NDCG@{{k}} {{kind}}")]),
    ("Online hit rate (before training)", "percentunit", [
        ("ncf_stream_online_hit_ratio", "HR@{{k}}")]),
    ("Freshness and snapshot age", "s", [
        ("histogram_quantile(0.99, sum by (le) (rate(ncf_stream_freshness_seconds_bucket[5m])))",
         "freshness p99"),
        ("ncf_stream_snapshot_age_seconds", "snapshot age")]),
    ("Requests by protocol", "reqps", [
        ("sum by (protocol) (rate(ncf_stream_requests_total[1m]))", "{{protocol}}")]),
    ("Request latency by protocol", "s", [
        ("histogram_quantile(0.5, sum by (le, protocol) "
         "(rate(ncf_stream_request_duration_seconds_bucket[1m])))", "p50 {{protocol}}"),
        ("histogram_quantile(0.99, sum by (le, protocol) "
         "(rate(ncf_stream_request_duration_seconds_bucket[1m])))", "p99 {{protocol}}")]),
    ("Store and index", "short", [
        ("ncf_stream_store_interactions", "interactions"),
        ("ncf_stream_users", "users"), ("ncf_stream_items", "items"),
        ("ncf_stream_index_items", "index items")]),
    ("Snapshots", "s", [
        ("histogram_quantile(0.99, sum by (le) "
         "(rate(ncf_stream_snapshot_publish_seconds_bucket[5m])))", "publish p99"),
        ("ncf_stream_snapshot_version", "version")]),
    ("Evaluation", "s", [
        ("rate(ncf_stream_eval_duration_seconds_sum[10m]) / "
         "rate(ncf_stream_eval_duration_seconds_count[10m])", "mean duration"),
        ("ncf_stream_eval_users", "hold-outs evaluated")]),
    # A group of trainers (docs/group.md): zero for a single trainer.
    ("Group exchanges: share of time, bytes/s", "short", [
        ("rate(ncf_stream_group_exchange_seconds_sum[1m])", "share of time exchanging"),
        ("rate(ncf_stream_group_exchange_bytes_total[1m])", "bytes sent/s")]),
]


def panel(i: int, title: str, unit: str, targets: list[tuple[str, str]]) -> dict[str, object]:
    return {
        "id": i + 1, "type": "timeseries", "title": title, "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [{"refId": chr(ord("A") + j), "datasource": DATASOURCE, "expr": expr,
                     "legendFormat": legend} for j, (expr, legend) in enumerate(targets)],
    }


def dashboard() -> dict[str, object]:
    return {
        "uid": "ncf-stream", "title": "ncf-stream", "schemaVersion": 39, "version": 1,
        "tags": ["ncf-stream", "recommender"], "timezone": "browser", "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"}, "editable": True,
        "panels": [panel(i, *p) for i, p in enumerate(PANELS)],
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
