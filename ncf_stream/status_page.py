"""The status page at ``/``: key figures and small charts, for people without Grafana.

The daemon samples a few figures every couple of seconds into :class:`History`
(``GET /v1/history`` serves them); the page is one self-contained HTML file
whose script fetches that JSON and draws SVG line charts: ingest and query
rates, query latency, HR@10, known users and items. Each has a value axis from
0 in its unit and a time axis in wall-clock HH:MM:SS. No external scripts, so
it works offline.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Sample:
    t: float  # wall clock, seconds
    events_consumed: int
    events_per_s: float | None  # None for the first sample: a rate needs two
    requests_per_s: float | None
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    hr10_sampled: float | None
    hr10_full: float | None
    model_version: int
    users: int
    items: int
    interactions: int
    # The evaluation behind hr10_*: hold-outs ranked by each protocol (the first,
    # quick one ranks few), and its candidate recall@10.
    eval_users: int | None
    eval_users_full: int | None
    candidate_recall: float | None


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
 svg text { font-size: 11px; fill: #555; }
 svg .unit { font-weight: 600; }
 svg .axis { stroke: #888; }
 svg .grid { stroke: #e4e4e4; }
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
 <div class="chart"><h3>Ingest</h3><svg id="ingest" width="440" height="180"></svg></div>
 <div class="chart"><h3>Top-k queries (HTTP and gRPC)</h3>
   <svg id="queries" width="440" height="180"></svg></div>
 <div class="chart"><h3>Top-k query latency</h3>
   <svg id="latency" width="440" height="180"></svg></div>
 <div class="chart"><h3>HR@10 on the rolling hold-out</h3>
   <svg id="hr" width="440" height="180"></svg></div>
 <div class="chart"><h3>Known users and items</h3>
   <svg id="sizes" width="440" height="180"></svg></div>
</div>
<p class="muted" id="clock"></p>
<script>
// Each chart: a value axis from 0 in the series' unit, a wall-clock time axis.
const CHARTS = [
  {id: "ingest", unit: "events/s", series: [["events_per_s", "#1f77b4", "events/s"]]},
  {id: "queries", unit: "requests/s", series: [["requests_per_s", "#8c564b", "requests/s"]]},
  {id: "latency", unit: "ms", series: [["latency_p50_ms", "#2ca02c", "p50"],
                                       ["latency_p99_ms", "#d62728", "p99"]]},
  {id: "hr", unit: "ratio", max: 1, series: [["hr10_sampled", "#9467bd", "sampled"],
                                             ["hr10_full", "#ff7f0e", "full catalogue"]]},
  {id: "sizes", unit: "count", series: [["users", "#17becf", "users"],
                                        ["items", "#bcbd22", "items"]]},
];
const M = {left: 50, right: 14, top: 24, bottom: 22};  // room for the axes' labels
const TIME_STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600];
const SVG = "http://www.w3.org/2000/svg";

function fmt(v, d) { return v === null || v === undefined ? "-" : Number(v).toFixed(d); }
function withN(v, n) {  // a figure from an evaluation, and how many users it ranked
  return v === null || v === undefined ? "-" : Number(v).toFixed(3) + " (n=" + n + ")";
}
function el(parent, tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  parent.appendChild(e);
  return e;
}
function niceStep(x) {  // the smallest 1, 2 or 5 times a power of ten at least x
  const base = Math.pow(10, Math.floor(Math.log10(x)));
  for (const m of [1, 2, 5, 10]) if (m * base >= x * (1 - 1e-9)) return m * base;
}
function valueLabel(v, step) {
  for (const [scale, suffix] of [[1e6, "M"], [1e3, "k"], [1, ""]]) {
    if (step >= scale || scale === 1) {
      const d = Math.max(0, Math.ceil(-Math.log10(step / scale) - 1e-9));
      return (v / scale).toFixed(d) + suffix;
    }
  }
}
function clock(t) {
  const d = new Date(t * 1000), two = n => String(n).padStart(2, "0");
  return two(d.getHours()) + ":" + two(d.getMinutes()) + ":" + two(d.getSeconds());
}
function chart(spec, samples) {
  const svg = document.getElementById(spec.id);
  const w = svg.width.baseVal.value, h = svg.height.baseVal.value;
  const x0 = M.left, x1 = w - M.right, y0 = h - M.bottom, y1 = M.top;
  svg.innerHTML = "";
  // Values: from 0 to a round number at or above the largest (or the fixed maximum).
  let hi = 0;
  for (const [key] of spec.series) for (const s of samples) {
    if (s[key] !== null && s[key] !== undefined) hi = Math.max(hi, s[key]);
  }
  const step = niceStep((spec.max || hi || 1) / 5);  // 0..1 while everything is 0
  const top = spec.max || step * Math.ceil(hi / step - 1e-9) || 1;
  const y = v => y0 - (y0 - y1) * v / top;
  for (let i = 0; i * step <= top * (1 + 1e-9); i++) {
    const v = i * step, yy = y(v).toFixed(1);
    el(svg, "line", {class: "grid", x1: x0, x2: x1, y1: yy, y2: yy});
    el(svg, "text", {class: "y-tick", x: x0 - 5, y: yy, "text-anchor": "end",
                     "dominant-baseline": "middle"}, valueLabel(v, step));
  }
  el(svg, "text", {class: "unit", x: 4, y: 13}, spec.unit);
  // Time: wall clock, ticks on round seconds or minutes, as many as fit.
  const ts = samples.map(s => s.t);
  let t0 = Math.min(...ts), t1 = Math.max(...ts);
  if (!samples.length) { t1 = Date.now() / 1000; t0 = t1 - 60; }
  if (t1 - t0 < 2) { t0 -= 1; t1 += 1; }
  const x = t => x0 + (x1 - x0) * (t - t0) / (t1 - t0);
  const fit = Math.max(2, Math.floor((x1 - x0) / 60));  // a label is ~50 px wide
  const tstep = TIME_STEPS.find(d => (t1 - t0) / d <= fit) || TIME_STEPS[TIME_STEPS.length - 1];
  for (let t = Math.ceil(t0 / tstep) * tstep; t <= t1; t += tstep) {
    const xx = x(t).toFixed(1);
    el(svg, "line", {class: "grid", x1: xx, x2: xx, y1: y1, y2: y0});
    el(svg, "line", {class: "axis", x1: xx, x2: xx, y1: y0, y2: y0 + 4});
    el(svg, "text", {class: "x-tick", x: xx, y: h - 5,  // the last kept inside the chart
                     "text-anchor": xx > w - 26 ? "end" : "middle"}, clock(t));
  }
  el(svg, "line", {class: "axis", x1: x0, x2: x0, y1: y1, y2: y0});
  el(svg, "line", {class: "axis", x1: x0, x2: x1, y1: y0, y2: y0});
  // The series, and a legend when there are several.
  let n = 0, lx = x1;
  for (const [key, color, name] of [...spec.series].reverse()) {
    const xy = samples.filter(s => s[key] !== null && s[key] !== undefined).map(s =>
      [x(s.t), y(s[key])]);
    n += xy.length;
    el(svg, "polyline", {points: xy.map(p => p[0].toFixed(1) + "," + p[1].toFixed(1))
                                    .join(" "), stroke: color, "data-series": key});
    if (spec.series.length > 1) {
      const label = el(svg, "text", {class: "legend", x: lx, y: 13, "text-anchor": "end",
                                     style: "fill: " + color}, name);
      lx -= label.getComputedTextLength() + 14;
      el(svg, "line", {x1: lx + 2, x2: lx + 10, y1: 9, y2: 9, stroke: color,
                       "stroke-width": 2});
      lx -= 6;
    }
  }
  if (!n) el(svg, "text", {x: (x0 + x1) / 2, y: (y0 + y1) / 2, "text-anchor": "middle"},
             "no data yet");
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
    ["HR@10 sampled", withN(last.hr10_sampled, last.eval_users)],
    ["HR@10 full", withN(last.hr10_full, last.eval_users_full)],
    ["candidate recall@10", fmt(last.candidate_recall, 3)],
    ["p99 latency (ms)", fmt(last.latency_p99_ms, 2)]];
  document.getElementById("figures").innerHTML = figures.map(([k, v]) =>
    `<div class="figure">${k}<b>${v}</b></div>`).join("");
  for (const spec of CHARTS) chart(spec, s);
  document.getElementById("clock").textContent = "Times in " +
    Intl.DateTimeFormat().resolvedOptions().timeZone + " (this browser's time zone); " +
    s.length + " points, a few seconds apart. Queries and latency: top-k requests only.";
  document.body.setAttribute("data-ready", "1");
}
refresh(); setInterval(refresh, 5000);
</script>
</body></html>
"""
