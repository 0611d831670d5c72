"""Metrics, the Grafana dashboard, Prometheus, the status page, the deployment files.

Real parts: a daemon fed through the real broker, a real Prometheus (Debian's
``prometheus``) scraping it, and the status page rendered by headless Chromium.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from conftest import require_program  # tests/conftest.py
from prometheus_client import CollectorRegistry

from consumers.broker import create_topics, free_port
from consumers.daemon import Daemon
from consumers.produce import produce_file
from ncf_stream.metrics import Metrics
from ncf_stream.proto import recommender_pb2 as pb
from ncf_stream.proto import recommender_pb2_grpc as pb_grpc
from ncf_stream.settings import Settings
from ncf_stream.synth import SynthConfig, generate, write

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "ncf-stream.json"
EVENTS = 6000


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in board["panels"] for t in p["targets"]]


# ---- static checks ------------------------------------------------------------------------


def test_dashboard_json_is_generated_from_the_panel_list() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("dashboard", DEPLOY / "grafana/dashboard.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert DASHBOARD.read_text() == module.render(), "run deploy/grafana/dashboard.py"


def test_dashboard_has_what_provisioning_needs() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml")
                                 .read_text())["datasources"]
    uids = {d["uid"] for d in datasources}
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)) >= 12
    for p in board["panels"]:
        assert p["datasource"]["uid"] in uids and p["targets"]
        assert all(t["datasource"]["uid"] in uids and t["expr"] for t in p["targets"])
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/ncf-stream.yml")
                              .read_text())["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"]


def test_every_metric_the_dashboard_uses_is_exported() -> None:
    names = set()
    for collector in Metrics(CollectorRegistry()).registry.collect():
        names |= {s.name for s in collector.samples}
    used = {m for e in dashboard_exprs() for m in re.findall(r"ncf_stream_[a-z0-9_]+", e)}
    assert used and used <= names, used - names


def test_compose_and_dockerfile_refer_to_real_paths() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"kafka", "ncf-stream", "prometheus", "grafana"} <= set(services)
    build = services["ncf-stream"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), volume
    prometheus = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    assert prometheus["scrape_configs"][0]["static_configs"][0]["targets"] == ["ncf-stream:8080"]
    instructions = [line.split()[0] for line in (ROOT / "Dockerfile").read_text().splitlines()
                    if line.strip() and not line.startswith("#") and not line.startswith(" ")]
    assert instructions[0] == "FROM" and "CMD" in instructions
    known = {"FROM", "WORKDIR", "COPY", "RUN", "ENV", "EXPOSE", "USER", "ENTRYPOINT", "CMD"}
    assert set(instructions) <= known
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY"):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), line


# ---- a live daemon ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    topic = f"obs-{time.time_ns()}"
    create_topics(kafka_bootstrap, [topic, f"{topic}.dlq"])
    path = tmp_path_factory.mktemp("obs") / "stream.csv"
    write(generate(SynthConfig(users=200, items=150, events=EVENTS, seed=5, topics=5)), path)
    s = Settings(kafka_bootstrap=kafka_bootstrap, kafka_topic=topic,
                 kafka_dlq_topic=f"{topic}.dlq", kafka_group_id=f"{topic}-g", http_port=0,
                 grpc_port=0, batch_size=1024, factors=8, mlp_layers=[16, 8],
                 publish_every_s=0.5, eval_interval_s=3600, eval_duty=1.0, device="cpu",
                 shutdown_grace_s=1.0)
    produce_file(path, s, show_progress=False)
    daemon = Daemon(s)
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    with httpx.Client(base_url=f"http://127.0.0.1:{daemon.http_port}", timeout=10) as c:
        deadline = time.monotonic() + 60
        while c.get("/v1/status").json()["snapshot_events"] < EVENTS:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        c.post("/v1/eval")
        stub = pb_grpc.RecommenderStub(grpc.insecure_channel(f"127.0.0.1:{daemon.grpc.port}"))
        for user in range(40):  # traffic on both protocols, for the latency panels
            c.post("/v1/recommend", json={"user": str(user), "k": 5})
            stub.Recommend(pb.RecommendRequest(user=str(user), k=5))
        while c.get("/v1/eval").json()["latest"] is None:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    yield daemon
    daemon.stop()
    thread.join(15)


def test_metrics_report_what_happened(live: Daemon) -> None:
    reg = live.metrics.registry
    assert reg.get_sample_value("ncf_stream_events_consumed_total") == EVENTS
    assert reg.get_sample_value("ncf_stream_snapshot_version") >= 1
    assert reg.get_sample_value("ncf_stream_requests_total", {
        "protocol": "grpc", "endpoint": "Recommend", "code": "OK"}) >= 40
    assert reg.get_sample_value("ncf_stream_requests_total", {
        "protocol": "http", "endpoint": "/v1/recommend", "code": "200"}) >= 40
    hr = reg.get_sample_value("ncf_stream_eval_hit_ratio", {"k": "10", "kind": "sampled"})
    assert hr is not None and 0 < hr <= 1


@pytest.mark.slow
def test_prometheus_scrapes_and_every_dashboard_query_returns_data(
    live: Daemon, tmp_path: Path
) -> None:
    binary = require_program("prometheus")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "ncf-stream", "static_configs": [
            {"targets": [f"127.0.0.1:{live.http_port}"]}]}]}))
    proc = subprocess.Popen([binary, f"--config.file={config}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        api = f"http://127.0.0.1:{port}/api/v1"
        deadline = time.monotonic() + 60
        missing = dashboard_exprs()
        while missing:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, f"no data for: {missing}"
            time.sleep(1)
            try:
                results = {e: httpx.get(f"{api}/query", params={"query": e}).json()
                           for e in missing}
            except httpx.TransportError:
                continue
            for expr, body in results.items():
                assert body["status"] == "success", (expr, body)
            missing = [e for e, body in results.items() if not body["data"]["result"]]
        targets = httpx.get(f"{api}/targets").json()["data"]["activeTargets"]
        assert targets and targets[0]["health"] == "up"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.slow
def test_status_page_renders_its_charts_in_chromium(live: Daemon, tmp_path: Path) -> None:
    browser = require_program("chromium", "chromium-browser")
    with httpx.Client(base_url=f"http://127.0.0.1:{live.http_port}") as c:
        deadline = time.monotonic() + 30
        # Charts need two samples with an evaluation behind them (one every 2 s).
        while sum(s["hr10_sampled"] is not None for s in c.get("/v1/history").json()[
                "samples"]) < 2:
            assert time.monotonic() < deadline
            c.post("/v1/recommend", json={"user": "1", "k": 5})
            time.sleep(0.5)
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=10000", "--dump-dom", f"http://127.0.0.1:{live.http_port}/"],
        capture_output=True, text=True, timeout=120, check=True,
        env={**os.environ, "TZ": "UTC"}).stdout
    samples = httpx.get(f"http://127.0.0.1:{live.http_port}/v1/history").json()["samples"]
    assert 'data-ready="1"' in dom
    # Wall-clock seconds the page's time axes can span (UTC, as the browser was told).
    span = range(int(samples[0]["t"]), int(samples[-1]["t"]) + 2)
    times = {time.strftime("%H:%M:%S", time.gmtime(t)) for t in span}
    for chart, unit in CHART_UNITS.items():
        svg = re.search(rf'<svg id="{chart}".*?</svg>', dom, re.S)
        assert svg, chart
        match = re.search(r'data-points="(\d+)"', svg.group(0))
        assert match and int(match.group(1)) >= 2, chart
        assert texts(svg.group(0), "unit") == [unit], chart
        ticks = [tick_value(v) for v in texts(svg.group(0), "y-tick")]
        assert len(ticks) >= 3 and ticks[0] == 0 and ticks == sorted(ticks), (chart, ticks)
        if unit == "ratio":
            assert ticks[-1] == 1, ticks
        labels = texts(svg.group(0), "x-tick")
        assert len(labels) >= 2 and set(labels) <= times, (chart, labels, sorted(times))
    assert re.search(r'<polyline points="[\d.]+,[\d.]+ [\d.]+,[\d.]+', dom)
    assert "events consumed" in dom and str(EVENTS) in dom


# The status page's charts and the unit each one's value axis states.
CHART_UNITS = {"ingest": "events/s", "queries": "requests/s", "latency": "ms", "hr": "ratio",
               "sizes": "count"}


def texts(svg: str, kind: str) -> list[str]:
    return re.findall(rf'<text class="{kind}"[^>]*>([^<]*)</text>', svg)


def tick_value(label: str) -> float:
    """A value axis label: a number, maybe with k or M."""
    scale = {"k": 1e3, "M": 1e6}.get(label[-1:], 1)
    return float(label[:-1] if scale != 1 else label) * scale
