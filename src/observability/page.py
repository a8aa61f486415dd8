"""The live status page served at `/`: one self-contained HTML document.

No CDN, font or chart library: the page must work on a machine with no internet access, so the
charts are SVG drawn by the few lines of inline JavaScript below from `/api/status`
(`src.observability.status.collect_status`), refreshed every few seconds. Every text from the
ledger is set with `textContent`, never as HTML: file names are untrusted input.
"""

from __future__ import annotations

REFRESH_SECONDS = 3

PAGE_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Transaction processor: status</title>
<style>
:root { --bg:#f5f6f8; --card:#fff; --ink:#1d2330; --muted:#6b7385; --line:#e3e6ec;
        --in:#2f6fdf; --done:#1c9c6b; --backlog:#e08a1e; --bad:#d1403a; --ok:#1c9c6b; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
       background:var(--bg); color:var(--ink); }
header { display:flex; align-items:center; gap:16px; padding:14px 24px; background:#1d2330; color:#fff; }
header h1 { font-size:17px; margin:0; font-weight:600; }
header .meta { margin-left:auto; color:#b8bfcc; font-size:12px; }
.pill { padding:3px 10px; border-radius:999px; font-size:12px; font-weight:600; background:#555; }
.pill.ok { background:var(--ok); } .pill.bad { background:var(--bad); } .pill.off { background:#777; }
main { padding:18px 24px 40px; max-width:1400px; margin:0 auto; }
.waiting { background:var(--card); border-left:4px solid var(--in); padding:10px 14px; margin-bottom:16px;
           border-radius:6px; box-shadow:0 1px 2px rgba(0,0,0,.06); }
.waiting b { color:var(--muted); font-weight:600; margin-right:6px; }
.waiting ul { margin:0; padding-left:18px; }
.problems { background:#fdecea; border-left:4px solid var(--bad); padding:10px 14px; margin-bottom:16px;
            border-radius:6px; }
.problems:empty { display:none; }
.kpis { display:grid; grid-template-columns:repeat(auto-fit,minmax(150px,1fr)); gap:12px; margin-bottom:16px; }
.kpi { background:var(--card); border-radius:8px; padding:12px 14px; box-shadow:0 1px 2px rgba(0,0,0,.06); }
.kpi .v { font-size:24px; font-weight:650; font-variant-numeric:tabular-nums; }
.kpi .l { color:var(--muted); font-size:12px; }
.charts { display:grid; grid-template-columns:repeat(auto-fit,minmax(400px,1fr)); gap:12px; margin-bottom:16px; }
.card { background:var(--card); border-radius:8px; padding:12px 14px; box-shadow:0 1px 2px rgba(0,0,0,.06);
        overflow:auto; }
.card h2 { font-size:13px; margin:0 0 8px; color:var(--muted); font-weight:600; text-transform:uppercase;
           letter-spacing:.04em; }
svg.chart { width:100%; height:190px; display:block; }
svg.chart text { font-size:10px; fill:var(--muted); }
svg.chart .grid { stroke:var(--line); stroke-width:1; }
svg.chart path.series { fill:none; stroke-width:2; }
svg.chart path.area { stroke:none; opacity:.18; }
.legend { display:flex; gap:14px; font-size:12px; color:var(--muted); margin-top:4px; flex-wrap:wrap; }
.legend i { display:inline-block; width:10px; height:10px; border-radius:2px; margin-right:5px;
            vertical-align:-1px; }
.tables { display:grid; grid-template-columns:1fr; gap:12px; }
table { border-collapse:collapse; width:100%; font-size:13px; }
th { text-align:left; color:var(--muted); font-weight:600; border-bottom:1px solid var(--line); padding:6px 8px; }
td { border-bottom:1px solid var(--line); padding:5px 8px; vertical-align:top; }
td.n { text-align:right; font-variant-numeric:tabular-nums; }
td.reason, td.msg { color:var(--muted); max-width:520px; overflow-wrap:anywhere; }
.st { padding:1px 8px; border-radius:999px; font-size:12px; background:#eef0f4; }
.st.done { background:#e3f5ed; color:#176f4d; } .st.failed, .st.conflict { background:#fdecea; color:#a3302b; }
.st.ingesting { background:#e6efff; color:#2552a3; }
.empty { color:var(--muted); font-style:italic; }
.two { display:grid; grid-template-columns:repeat(auto-fit,minmax(520px,1fr)); gap:12px; }
</style>
</head>
<body>
<header>
  <h1>Transaction processor</h1>
  <span id="health" class="pill off">loading</span>
  <span class="meta">ledger read at <span id="generated">-</span> UTC &middot; refreshes every
    __REFRESH__ s</span>
</header>
<main>
  <div class="waiting"><b>Waiting for</b><ul id="waiting"><li>loading...</li></ul></div>
  <div class="problems" id="problems"></div>
  <section class="kpis">
    <div class="kpi"><div class="v" data-k="chunks_written">-</div><div class="l">chunks written</div></div>
    <div class="kpi"><div class="v" data-k="chunks_processed">-</div><div class="l">chunks processed</div></div>
    <div class="kpi"><div class="v" data-k="backlog_chunks">-</div><div class="l">backlog (chunks)</div></div>
    <div class="kpi"><div class="v" data-k="rows_ingested">-</div><div class="l">rows ingested</div></div>
    <div class="kpi"><div class="v" data-k="rows_quarantined">-</div><div class="l">rows quarantined</div></div>
    <div class="kpi"><div class="v" data-k="detections">-</div><div class="l">detections</div></div>
    <div class="kpi"><div class="v" data-k="p50">-</div><div class="l">latency p50 (written &rarr; processed)</div></div>
    <div class="kpi"><div class="v" data-k="p95">-</div><div class="l">latency p95</div></div>
  </section>
  <section class="charts">
    <div class="card"><h2>Throughput, rows per minute (last hour)</h2>
      <svg class="chart" id="chart-throughput" viewBox="0 0 600 190" preserveAspectRatio="xMinYMin meet"></svg>
      <div class="legend" id="legend-throughput"></div></div>
    <div class="card"><h2>Backlog, chunks waiting for Y (last hour)</h2>
      <svg class="chart" id="chart-backlog" viewBox="0 0 600 190" preserveAspectRatio="xMinYMin meet"></svg>
      <div class="legend" id="legend-backlog"></div></div>
    <div class="card"><h2>Detections per pattern per minute (last hour)</h2>
      <svg class="chart" id="chart-detections" viewBox="0 0 600 190" preserveAspectRatio="xMinYMin meet"></svg>
      <div class="legend" id="legend-detections"></div></div>
  </section>
  <section class="tables">
    <div class="card"><h2>Files</h2><table id="files"><thead><tr><th>name</th><th>kind</th><th>status</th>
      <th>rows</th><th>quarantined</th><th>chunks</th><th>reason</th><th>updated (UTC)</th></tr></thead>
      <tbody></tbody></table></div>
    <div class="two">
      <div class="card"><h2>Last detections</h2><table id="detections"><thead><tr><th>id</th><th>pattern</th>
        <th>action</th><th>customer</th><th>merchant</th><th>detected (UTC)</th><th>chunk</th></tr></thead>
        <tbody></tbody></table></div>
      <div class="card"><h2>Last failures</h2><table id="failures"><thead><tr><th>when (UTC)</th>
        <th>component</th><th>event</th><th>message</th></tr></thead><tbody></tbody></table>
        <h2 style="margin-top:14px">Failed chunks</h2><table id="failed-chunks"><thead><tr><th>chunk</th>
        <th>file</th><th>#</th><th>lines</th></tr></thead><tbody></tbody></table></div>
    </div>
    <div class="card"><h2>Who works (Y's leader, X's file leases)</h2><table id="leadership"><thead><tr>
      <th>role</th><th>holder</th><th>detail</th></tr></thead><tbody></tbody></table></div>
  </section>
</main>
<script>
"use strict";
const NS = "http://www.w3.org/2000/svg";
const PATTERN_COLORS = {PatId1: "#7b4fd6", PatId2: "#e08a1e", PatId3: "#1c9c6b"};
const fmt = (n) => (n === null || n === undefined) ? "-" : Number(n).toLocaleString("en-US");
const secs = (s) => (s === null || s === undefined) ? "-" : (s < 10 ? s.toFixed(2) : s.toFixed(1)) + " s";
const hhmm = (iso) => iso ? iso.slice(11, 16) : "";
const when = (iso) => iso ? iso.slice(0, 19).replace("T", " ") : "";

function el(tag, attrs, text) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

// A line chart of several series over the same minutes; `area` shades under the first series.
function lineChart(svg, times, series, legend, area) {
  svg.replaceChildren();
  const W = Math.max(300, Math.round(svg.clientWidth || 600)), H = 190, L = 44, R = 10, T = 8, B = 20;
  svg.setAttribute("viewBox", "0 0 " + W + " " + H);
  const max = Math.max(4, ...series.flatMap((s) => s.values));
  const nice = niceMax(max);
  const x = (i) => L + (times.length < 2 ? 0 : i * (W - L - R) / (times.length - 1));
  const y = (v) => T + (H - T - B) * (1 - v / nice);
  for (let k = 0; k <= 4; k++) {
    const v = nice * k / 4;
    svg.appendChild(el("line", {x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid"}));
    svg.appendChild(el("text", {x: L - 4, y: y(v) + 3, "text-anchor": "end"}, compact(v)));
  }
  for (let i = 0; i < times.length; i += 10) {
    svg.appendChild(el("text", {x: x(i), y: H - 5, "text-anchor": "middle"}, hhmm(times[i])));
  }
  series.forEach((s, n) => {
    const d = s.values.map((v, i) => (i ? "L" : "M") + x(i).toFixed(1) + "," + y(v).toFixed(1)).join(" ");
    if (area && n === 0 && s.values.length) {
      const a = d + " L" + x(s.values.length - 1).toFixed(1) + "," + y(0) + " L" + x(0) + "," + y(0) + " Z";
      svg.appendChild(el("path", {d: a, class: "area", style: "fill:" + s.color}));
    }
    const p = el("path", {d: d, class: "series", style: "stroke:" + s.color, "data-name": s.name});
    p.appendChild(el("title", {}, s.name));
    svg.appendChild(p);
  });
  legend.replaceChildren(...series.map((s) => {
    const span = document.createElement("span");
    const sw = document.createElement("i");
    sw.style.background = s.color;
    span.append(sw, s.label || (s.name + " (" + fmt(s.values.reduce((a, b) => a + b, 0)) + (s.total || "") + ")"));
    return span;
  }));
}

// The top of the y axis: four gridline steps of 1, 2, 2.5 or 5 times a power of ten.
function niceMax(v) {
  const raw = v / 4, p = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= raw) return 4 * m * p;
  return 40 * p;
}
function compact(v) {
  if (v >= 1e6) return (v / 1e6).toFixed(v % 1e6 ? 1 : 0) + "M";
  if (v >= 1e3) return (v / 1e3).toFixed(v % 1e3 ? 1 : 0) + "k";
  return String(Math.round(v * 10) / 10);
}

function fillTable(id, rows, cells) {
  const body = document.querySelector("#" + id + " tbody");
  const cols = document.querySelectorAll("#" + id + " th").length;
  if (!rows.length) {
    const tr = document.createElement("tr");
    const td = document.createElement("td");
    td.colSpan = cols; td.className = "empty"; td.textContent = "none";
    tr.appendChild(td);
    body.replaceChildren(tr);
    return;
  }
  body.replaceChildren(...rows.map((r) => {
    const tr = document.createElement("tr");
    for (const [text, cls] of cells(r)) {
      const td = document.createElement("td");
      if (cls === "st") {
        const s = document.createElement("span");
        s.className = "st " + text; s.textContent = text; td.appendChild(s);
      } else {
        td.textContent = text === null || text === undefined ? "" : String(text);
        if (cls) td.className = cls;
      }
      tr.appendChild(td);
    }
    return tr;
  }));
}

function render(s) {
  const t = s.totals;
  for (const k of ["chunks_written", "chunks_processed", "backlog_chunks", "rows_ingested", "rows_quarantined",
                   "detections"]) {
    document.querySelector('[data-k="' + k + '"]').textContent = fmt(t[k]);
  }
  document.querySelector('[data-k="p50"]').textContent = secs(s.latency.p50_seconds);
  document.querySelector('[data-k="p95"]').textContent = secs(s.latency.p95_seconds);
  document.getElementById("generated").textContent = when(s.generated_at);
  const health = document.getElementById("health");
  health.className = "pill " + (s.problems.length ? "bad" : "ok");
  health.textContent = s.problems.length ? s.problems.length + " problem(s)" : "all well";
  const problems = document.getElementById("problems");
  problems.replaceChildren(...s.problems.map((p) => { const d = document.createElement("div"); d.textContent = p; return d; }));
  document.getElementById("waiting").replaceChildren(...s.waiting_for.map((w) => {
    const li = document.createElement("li"); li.textContent = w; return li;
  }));

  const times = s.series.map((p) => p.t);
  lineChart(document.getElementById("chart-throughput"), times, [
    {name: "ingested (X)", color: "var(--in)", values: s.series.map((p) => p.ingested_rows)},
    {name: "processed (Y)", color: "var(--done)", values: s.series.map((p) => p.processed_rows)},
  ], document.getElementById("legend-throughput"));
  lineChart(document.getElementById("chart-backlog"), times, [
    {name: "backlog", label: "chunks written, not yet processed: " + fmt(t.backlog_chunks) + " now",
     color: "var(--backlog)", values: s.series.map((p) => p.backlog_chunks)},
  ], document.getElementById("legend-backlog"), true);
  const patterns = Array.from(new Set([...Object.keys(s.detections.by_pattern), "PatId1", "PatId2", "PatId3"])).sort();
  const index = Object.fromEntries(times.map((tm, i) => [tm, i]));
  lineChart(document.getElementById("chart-detections"), times, patterns.map((p) => {
    const values = times.map(() => 0);
    for (const d of s.detections.series) if (d.pattern_id === p && d.t in index) values[index[d.t]] += d.count;
    const hour = values.reduce((x, y) => x + y, 0);
    return {name: p, color: PATTERN_COLORS[p] || "#555", values: values,
            label: p + ": " + fmt(hour) + " this hour, " + fmt(s.detections.by_pattern[p] || 0) + " in all"};
  }), document.getElementById("legend-detections"));

  fillTable("files", s.files, (f) => [[f.name], [f.kind], [f.status, "st"], [fmt(f.rows_ingested), "n"],
    [fmt(f.rows_quarantined), "n"], [fmt(f.chunks), "n"], [f.reason, "reason"], [when(f.updated_at)]]);
  fillTable("detections", s.last_detections, (d) => [[d.id, "n"], [d.pattern_id], [d.action_type],
    [d.customer_name], [d.merchant_id], [when(d.detection_time)], [d.chunk_id, "n"]]);
  fillTable("failures", s.failures.errors, (e) => [[when(e.logged_at)], [e.component], [e.event],
    [e.message, "msg"]]);
  fillTable("failed-chunks", s.failures.failed_chunks, (c) => [[c.seq, "n"], [c.name], [c.chunk_seq, "n"],
    [c.first_line + "-" + c.last_line]]);
  const who = s.leadership, leader = who.y_leader;
  fillTable("leadership", [
    leader ? ["Y leader", leader.holder, "term " + leader.term + " since " + when(leader.since) + " UTC"]
           : ["Y leader", "none yet", ""],
    ...who.leases.map((l) => ["X lease", l.holder,
      l.file_id + ", renewal due within " + Math.round(l.expires_in_seconds) + " s"]),
    ["lease takeovers", fmt(who.lease_takeovers), "files taken from an X that stopped renewing"],
  ], (r) => [[r[0]], [r[1]], [r[2], "msg"]]);
  document.body.dataset.loaded = s.generated_at;
}

async function refresh() {
  try {
    const r = await fetch("api/status", {cache: "no-store"});
    if (!r.ok) throw new Error("HTTP " + r.status + ": " + (await r.text()).slice(0, 200));
    render(await r.json());
  } catch (e) {
    const health = document.getElementById("health");
    health.className = "pill off";
    health.textContent = "ledger unreachable";
    health.title = String(e);
  }
}
refresh();
setInterval(refresh, __REFRESH__ * 1000);
</script>
</body>
</html>
""".replace("__REFRESH__", str(REFRESH_SECONDS))
