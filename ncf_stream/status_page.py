"""The status page at ``/``: key figures and small charts, for people without Grafana.

The daemon samples a few figures every couple of seconds into :class:`History`
(``GET /v1/history`` serves them); the page is one self-contained HTML file
whose script fetches that JSON and draws SVG line charts: ingest rate, query
latency and HR@10 over time. No external scripts, so it works offline.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Sample:
    t: float  # wall clock, seconds
    events_consumed: int
    events_per_s: float
    requests_per_s: float
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    hr10_sampled: float | None
    hr10_full: float | None
    model_version: int
    users: int
    items: int
    interactions: int


class History:
    """A bounded, thread-safe series of samples."""

    def __init__(self, size: int = 720) -> None:
        self._samples: deque[Sample] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, sample: Sample) -> None:
        with self._lock:
            self._samples.append(sample)

    def last(self) -> Sample | None:
        with self._lock:
            return self._samples[-1] if self._samples else None

    def as_list(self) -> list[dict[str, object]]:
        with self._lock:
            return [asdict(s) for s in self._samples]


class LatencyWindow:
    """Recent request latencies, for the page's percentiles (Prometheus has the rest)."""

    def __init__(self, size: int = 2000) -> None:
        self._values: deque[float] = deque(maxlen=size)
        self.count = 0

    def add(self, seconds: float) -> None:
        self._values.append(seconds)
        self.count += 1

    def percentiles(self) -> tuple[float | None, float | None]:
        values = sorted(self._values)
        if not values:
            return None, None
        pick = lambda q: round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 3)  # noqa: E731
        return pick(0.5), pick(0.99)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ncf-stream</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font: 14px system-ui, sans-serif; margin: 2em; color: #222; }
 .figures { display: flex; flex-wrap: wrap; gap: 1em; margin-bottom: 1.5em; }
 .figure { border: 1px solid #ddd; border-radius: 6px; padding: .6em 1em; min-width: 9em; }
 .figure b { display: block; font-size: 1.5em; }
 .charts { display: flex; flex-wrap: wrap; gap: 1.5em; }
 .chart h3 { margin: 0 0 .3em 0; font-size: 1em; }
 svg { border: 1px solid #ddd; background: #fafafa; }
 polyline { fill: none; stroke-width: 1.5; }
 .muted { color: #777; }
</style></head>
<body>
<h1>ncf-stream</h1>
<p class="muted">Online NeuMF. JSON: <a href="/v1/status">/v1/status</a>,
<a href="/v1/eval">/v1/eval</a>, <a href="/v1/history">/v1/history</a>;
Prometheus: <a href="/metrics">/metrics</a>; API: <a href="/docs">/docs</a>.</p>
<div class="figures" id="figures"></div>
<div class="charts">
 <div class="chart"><h3>Ingest (events/s)</h3>
   <svg id="ingest" width="420" height="140"></svg></div>
 <div class="chart"><h3>Query latency (ms, p50 and p99)</h3>
   <svg id="latency" width="420" height="140"></svg></div>
 <div class="chart"><h3>HR@10 (sampled and full)</h3>
   <svg id="hr" width="420" height="140"></svg></div>
</div>
<script>
function fmt(v, d) { return v === null || v === undefined ? "-" : Number(v).toFixed(d); }
function chart(id, samples, series) {
  const svg = document.getElementById(id);
  const w = svg.width.baseVal.value, h = svg.height.baseVal.value, pad = 6;
  const pts = samples.map(s => s.t);
  let lo = Infinity, hi = -Infinity, n = 0;
  for (const [key] of series) for (const s of samples) {
    const v = s[key];
    if (v !== null && v !== undefined) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  }
  if (hi === lo) { hi = lo + 1; }
  const t0 = Math.min(...pts), t1 = Math.max(...pts) || t0 + 1;
  svg.innerHTML = "";
  for (const [key, color] of series) {
    const xy = samples.filter(s => s[key] !== null && s[key] !== undefined).map(s =>
      [pad + (w - 2 * pad) * (s.t - t0) / Math.max(t1 - t0, 1e-9),
       h - pad - (h - 2 * pad) * (s[key] - lo) / (hi - lo)]);
    n += xy.length;
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", xy.map(p => p[0].toFixed(1) + "," + p[1].toFixed(1)).join(" "));
    line.setAttribute("stroke", color);
    line.setAttribute("data-series", key);
    svg.appendChild(line);
  }
  svg.setAttribute("data-points", n);
}
async function refresh() {
  const [status, history] = await Promise.all([
    fetch("/v1/status").then(r => r.json()), fetch("/v1/history").then(r => r.json())]);
  const s = history.samples, last = s[s.length - 1] || {};
  const figures = [
    ["events consumed", status.events_consumed], ["dead letters", status.events_rejected],
    ["consumer lag", status.consumer_lag], ["users", status.users], ["items", status.items],
    ["interactions", status.interactions], ["model version", status.model_version],
    ["snapshot age (s)", fmt(status.snapshot_age_seconds, 1)],
    ["HR@10 sampled", fmt(last.hr10_sampled, 3)], ["HR@10 full", fmt(last.hr10_full, 3)],
    ["p99 latency (ms)", fmt(last.latency_p99_ms, 2)]];
  document.getElementById("figures").innerHTML = figures.map(([k, v]) =>
    `<div class="figure">${k}<b>${v}</b></div>`).join("");
  chart("ingest", s, [["events_per_s", "#1f77b4"]]);
  chart("latency", s, [["latency_p50_ms", "#2ca02c"], ["latency_p99_ms", "#d62728"]]);
  chart("hr", s, [["hr10_sampled", "#9467bd"], ["hr10_full", "#ff7f0e"]]);
  document.body.setAttribute("data-ready", "1");
}
refresh(); setInterval(refresh, 5000);
</script>
</body></html>
"""
