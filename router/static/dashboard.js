// The workerpool dashboard (index.html): polls api/status and api/history every POLL_MS and
// draws the worker table and four time charts. Every text from the router goes in through
// textContent, never as markup: worker errors and names are not trusted.
"use strict";

const POLL_MS = 1000;
const FETCH_TIMEOUT_MS = 3000; // longer than the listener's wait for a busy loop (1 s)
const MIN_WINDOW_S = 60; // the time axis spans at least this, at most the history's span
const COLORS = ["#2563eb", "#0d9488", "#9333ea", "#d97706", "#db2777", "#4d7c0f"];
const ERROR_COLOR = "#dc2626";
const RESTART_COLOR = "#c2410c";
const SVG_NS = "http://www.w3.org/2000/svg";

const view = {
  status: null, // the last api/status object
  history: null, // the last api/history object
  pid: null, // the router process those came from
  failingSince: null, // Date of the first failed poll in a row, null while reachable
  notice: "", // shown beside the router line once a restart has been seen
};

// -- fetching -----------------------------------------------------------------------------------
async function getJSON(path) {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), FETCH_TIMEOUT_MS);
  try {
    const resp = await fetch(path, { signal: abort.signal, cache: "no-store" });
    if (!resp.ok) throw new Error(`${path}: HTTP ${resp.status}`);
    return await resp.json();
  } catch (err) {
    if (err.name === "AbortError") throw new Error(`no answer within ${FETCH_TIMEOUT_MS / 1000} s`);
    throw err;
  } finally {
    clearTimeout(timer);
  }
}

async function poll() {
  try {
    const status = await getJSON("api/status");
    const history = await getJSON("api/history");
    reachable(status, history);
  } catch (err) {
    unreachable(err);
  }
  setTimeout(poll, POLL_MS);
}

function reachable(status, history) {
  const pid = status.router.pid;
  if (view.pid !== null && pid !== view.pid) {
    view.notice = `router restarted at ${clock(new Date())} (pid ${view.pid} → ${pid}): its history starts again`;
  }
  view.pid = pid;
  view.status = status;
  view.history = history;
  view.failingSince = null;
  render();
}

function unreachable(err) {
  if (view.failingSince === null) view.failingSince = new Date();
  const reason = err instanceof TypeError ? "connection failed" : err.message;
  const banner = byId("banner");
  banner.textContent = `Router unreachable since ${clock(view.failingSince)} (${reason}); ` +
    "retrying every second. The figures below are the last ones received.";
  banner.hidden = false;
  setLink("unreachable", "router unreachable");
  byId("main").classList.add("stale");
}

// -- rendering ----------------------------------------------------------------------------------
function render() {
  byId("banner").hidden = true;
  byId("main").classList.remove("stale");
  setLink("live", `live · ${clock(new Date())}`);
  const { status, history } = view;
  const colors = serviceColors(status);
  renderRouter(status.router);
  renderServices(status.services, colors);
  renderWorkers(status.workers);
  renderNodes(status.nodes || []);
  renderCharts(history, colors);
}

function setLink(state, text) {
  const link = byId("link");
  link.dataset.state = state;
  link.textContent = text;
}

function renderRouter(r) {
  const el = byId("router");
  el.dataset.pid = r.pid;
  const parts = [`router pid ${r.pid}`, `up ${duration(r.uptime)}`, r.frontend,
    `${r.clients} client${r.clients === 1 ? "" : "s"}`];
  if (r.draining) parts.push("draining");
  el.textContent = parts.join(" · ");
  const notice = byId("notice");
  notice.textContent = view.notice;
  notice.hidden = !view.notice;
}

function serviceColors(status) {
  const colors = new Map();
  status.services.forEach((s, i) => colors.set(s.name, COLORS[i % COLORS.length]));
  return colors;
}

function renderServices(services, colors) {
  const box = byId("services");
  box.replaceChildren(...services.map((s) => {
    const card = el("div", "service");
    const name = el("span", "name");
    const swatch = el("span", "swatch");
    swatch.style.background = colors.get(s.name);
    name.append(swatch, s.name);
    card.append(name,
      fig("workers", s.workers + (s.spares ? ` +${s.spares} spare` : "")),
      fig("queued", `${s.queued}/${s.queue_capacity}`),
      fig("in flight", s.in_flight),
      fig("completed", s.completed),
      fig("errored", s.errored),
      fig("utilization", percent(s.utilization)));
    return card;
  }));
}

function fig(label, value) {
  const span = el("span", "fig");
  const b = el("b");
  b.textContent = value;
  span.append(`${label} `, b);
  return span;
}

// The worker table's columns: the class of their cells ("num" ones are right-aligned) and
// what a status row puts in them.
const COLUMNS = [
  ["col-id", (w) => w.id],
  ["col-state", (w) => stateBadge(w.state)],
  ["col-node", (w) => w.node ?? "-"],
  ["col-device", (w) => w.device],
  ["col-in-flight num", (w) => `${w.in_flight}/${w.capacity ?? "-"}${w.prefetch ? `+${w.prefetch}` : ""}`],
  ["col-completed num", (w) => w.completed],
  ["col-errored num", (w) => w.errored],
  ["col-restarts num", (w) => w.restarts],
  ["col-utilization", (w) => utilizationBar(w.utilization)],
  ["col-uptime num", (w) => (w.uptime ? duration(w.uptime) : "-")],
  ["col-error", (w) => lastLine(w.last_error)],
];

function renderWorkers(workers) {
  fillTable("workers", workers, COLUMNS, "worker", (w) => w.id, "no workers registered",
    (tr, w) => { if (w.last_error) tr.lastChild.title = w.last_error; });
}

// The node table's columns, as `workerpool status` shows its NODE table.
const NODE_COLUMNS = [
  ["col-node", (n) => n.node],
  ["col-host", (n) => n.host ?? "-"],
  ["col-pid num", (n) => n.pid ?? "-"],
  ["col-state", (n) => stateBadge(n.state)],
  ["col-workers num", (n) => `${n.workers}/${n.slots}`],
  ["col-seen num", (n) => duration(n.seen)],
  ["col-rtt num", (n) => n.rtt_ms ?? "-"],
  ["col-srtt num", (n) => n.rtt_smoothed_ms ?? "-"],
];

function renderNodes(nodes) {
  fillTable("nodes", nodes, NODE_COLUMNS, "node", (n) => n.node, "no supervisor registered");
}

// Fills the table ``id`` with a row per item (its ``data-KEY`` from ``keyOf``) and a cell
// per column, or one row saying ``empty``; ``decorate(tr, item)`` finishes a row.
function fillTable(id, items, columns, key, keyOf, empty, decorate = () => {}) {
  const body = byId(id).tBodies[0];
  if (!items.length) {
    const td = el("td", "empty");
    td.colSpan = columns.length;
    td.textContent = empty;
    const tr = el("tr");
    tr.append(td);
    body.replaceChildren(tr);
    return;
  }
  body.replaceChildren(...items.map((item) => {
    const tr = el("tr");
    tr.dataset[key] = keyOf(item);
    for (const [cls, value] of columns) {
      const td = el("td", cls);
      td.append(value(item));
      tr.append(td);
    }
    decorate(tr, item);
    return tr;
  }));
}

function stateBadge(state) {
  const s = el("span", `state ${state}`);
  s.textContent = state;
  return s;
}

function utilizationBar(u) {
  const wrap = el("span");
  if (u === null || u === undefined) {
    wrap.textContent = "-";
    return wrap;
  }
  const bar = el("span", "bar");
  const fill = el("span");
  fill.style.width = `${Math.round(u * 100)}%`;
  bar.append(fill);
  wrap.append(bar, percent(u));
  return wrap;
}

// -- charts -------------------------------------------------------------------------------------
function renderCharts(history, colors) {
  const samples = history.samples;
  const names = [...colors.keys()];
  const one = names.length === 1;
  const label = (svc, what) => (one ? what : `${svc} ${what}`);
  const column = (svc, key, scale = 1) =>
    samples.map((s) => {
      const v = s.services[svc] ? s.services[svc][key] : null;
      return [s.t, v === null || v === undefined ? null : v * scale];
    });
  const window = timeWindow(history);
  const deaths = history.deaths;
  const throughput = [];
  const latency = [];
  const queue = [];
  for (const svc of names) {
    const color = colors.get(svc);
    throughput.push({ label: label(svc, "ok"), color, points: column(svc, "requests_per_s") });
    const errors = column(svc, "errors_per_s");
    if (errors.some(([, v]) => v > 0)) {
      throughput.push({ label: label(svc, "errors"), color: one ? ERROR_COLOR : color, dashed: true,
        points: errors });
    }
    latency.push({ label: label(svc, "p50"), color, points: column(svc, "p50_s", 1000) });
    latency.push({ label: label(svc, "p99"), color, dashed: true, points: column(svc, "p99_s", 1000) });
    queue.push({ label: label(svc, "queued"), color, points: column(svc, "queued") });
    queue.push({ label: label(svc, "in flight"), color, dashed: true, points: column(svc, "in_flight") });
  }
  const restarts = [{ label: "restarts", color: RESTART_COLOR, step: true,
    points: samples.map((s) => [s.t, s.restarts]) }];
  drawChart(byId("chart-throughput"), throughput, window, deaths, history.interval);
  drawChart(byId("chart-latency"), latency, window, deaths, history.interval);
  drawChart(byId("chart-queue"), queue, window, deaths, history.interval, true);
  drawChart(byId("chart-restarts"), restarts, window, deaths, history.interval, true);
}

function timeWindow(history) {
  const end = history.now;
  const first = history.samples.length ? history.samples[0].t : end;
  const span = Math.min(history.span, Math.max(MIN_WINDOW_S, end - first));
  return [end - span, end];
}

// One chart: ``series`` ({label, color, points: [[t, v or null]], dashed, step}) over
// ``window`` ([t0, t1], the router's wall clock), a marker per death.
function drawChart(figure, series, [t0, t1], deaths, interval, integers = false) {
  const svg = figure.querySelector("svg");
  const width = svg.clientWidth || 600;
  const height = svg.clientHeight || 205;
  const m = { l: 46, r: 10, t: 8, b: 20 };
  const plotW = width - m.l - m.r;
  const plotH = height - m.t - m.b;
  const visible = (t) => t >= t0 - interval && t <= t1;
  let max = 0;
  let points = 0;
  for (const s of series) {
    for (const [t, v] of s.points) {
      if (v !== null && visible(t)) {
        points += 1;
        max = Math.max(max, v);
      }
    }
  }
  const ticks = valueTicks(max, integers);
  const top = ticks[ticks.length - 1];
  const x = (t) => m.l + ((t - t0) / (t1 - t0)) * plotW;
  const y = (v) => m.t + plotH - (v / top) * plotH;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.dataset.points = points;
  svg.dataset.max = max;
  const nodes = [];
  for (const v of ticks) {
    nodes.push(svgEl("line", { class: "grid", x1: m.l, x2: width - m.r, y1: y(v), y2: y(v) }));
    nodes.push(svgText(number(v), m.l - 6, y(v) + 4, "end"));
  }
  for (const t of timeTicks(t0, t1)) {
    nodes.push(svgEl("line", { class: "axis", x1: x(t), x2: x(t), y1: m.t + plotH, y2: m.t + plotH + 4 }));
    if (x(t) + 26 > width) continue; // its label would be cut off at the right edge
    nodes.push(svgText(clock(new Date(t * 1000), t1 - t0 >= 300), x(t), height - 4, "middle"));
  }
  nodes.push(svgEl("line", { class: "axis", x1: m.l, x2: width - m.r, y1: m.t + plotH, y2: m.t + plotH }));
  for (const s of series) {
    const d = linePath(s.points.filter(([t]) => visible(t)), x, y, s.step, 3 * interval);
    if (!d) continue;
    const path = svgEl("path", { class: "series", d, stroke: s.color });
    if (s.dashed) path.setAttribute("stroke-dasharray", "5 3");
    nodes.push(path);
  }
  for (const death of deaths) {
    if (death.t >= t0 && death.t <= t1) nodes.push(deathMarker(death, x(death.t), m.t, m.t + plotH));
  }
  if (!points) nodes.push(svgText("no data yet", m.l + plotW / 2, m.t + plotH / 2, "middle", "nodata"));
  svg.replaceChildren(...nodes);
  legend(figure.querySelector(".legend"), series, integers);
}

// The SVG path of ``points``, broken where a value is missing or samples are over ``gap`` apart.
function linePath(points, x, y, step, gap) {
  let d = "";
  let last = null;
  for (const [t, v] of points) {
    if (v === null) {
      last = null;
      continue;
    }
    const px = x(t).toFixed(1);
    const py = y(v).toFixed(1);
    if (last === null || t - last > gap) d += `M${px},${py}`;
    else d += step ? `H${px}V${py}` : `L${px},${py}`;
    last = t;
  }
  return d;
}

function deathMarker(death, px, top, bottom) {
  const g = svgEl("g", { class: "death" });
  g.dataset.worker = death.worker;
  g.dataset.cause = death.cause;
  const title = svgEl("title");
  const times = death.count > 1 ? ` (${death.count} times)` : "";
  title.textContent = `${clock(new Date(death.t * 1000))} worker ${death.worker} died: ${death.cause}${times}` +
    (death.last_error ? `\n${death.last_error}` : "");
  g.append(title,
    svgEl("line", { x1: px, x2: px, y1: top, y2: bottom }),
    svgEl("line", { class: "hit", x1: px, x2: px, y1: top, y2: bottom }),
    svgEl("path", { d: `M${px},${bottom - 9}L${px - 5},${bottom}L${px + 5},${bottom}Z` }));
  return g;
}

function legend(box, series, integers) {
  box.replaceChildren(...series.map((s) => {
    const key = el("span", s.dashed ? "key dashed" : "key");
    key.style.setProperty("--c", s.color);
    const last = [...s.points].reverse().find(([, v]) => v !== null);
    const b = el("b");
    b.textContent = last ? number(last[1], integers) : "-";
    key.append(`${s.label} `, b);
    return key;
  }));
}

// 0 and evenly spaced round values up to at least ``max`` (1, 2 or 5 times a power of ten).
function valueTicks(max, integers) {
  if (!(max > 0)) return [0, 1];
  let step = 10 ** Math.floor(Math.log10(max / 4));
  for (const f of [1, 2, 5, 10]) {
    if (max / (step * f) <= 4) {
      step *= f;
      break;
    }
  }
  if (integers) step = Math.max(1, Math.round(step));
  const ticks = [];
  for (let v = 0; v < max + step * 1e-9; v += step) ticks.push(v);
  if (ticks[ticks.length - 1] < max) ticks.push(ticks[ticks.length - 1] + step);
  return ticks;
}

function timeTicks(t0, t1) {
  const steps = [5, 10, 15, 30, 60, 120, 300, 600];
  const step = steps.find((s) => (t1 - t0) / s <= 6) || 600;
  const ticks = [];
  for (let t = Math.ceil(t0 / step) * step; t <= t1; t += step) ticks.push(t);
  return ticks;
}

// -- helpers ------------------------------------------------------------------------------------
function byId(id) {
  return document.getElementById(id);
}

function el(tag, cls) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  return node;
}

function svgEl(tag, attrs = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function svgText(text, px, py, anchor, cls) {
  const node = svgEl("text", { x: px, y: py, "text-anchor": anchor });
  if (cls) node.setAttribute("class", cls);
  node.textContent = text;
  return node;
}

function clock(date, short = false) {
  const pad = (n) => String(n).padStart(2, "0");
  const hm = `${pad(date.getHours())}:${pad(date.getMinutes())}`;
  return short ? hm : `${hm}:${pad(date.getSeconds())}`;
}

function duration(seconds) {
  if (seconds < 60) return `${seconds.toFixed(1)}s`;
  const s = Math.floor(seconds);
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

function number(v, integers = false) {
  if (integers || Number.isInteger(v)) return String(Math.round(v));
  const digits = Math.abs(v) >= 100 ? 0 : Math.abs(v) >= 10 ? 1 : Math.abs(v) >= 1 ? 2 : 3;
  return String(Number(v.toFixed(digits)));
}

function percent(u) {
  return u === null || u === undefined ? "-" : `${Math.round(u * 100)}%`;
}

function lastLine(text) {
  if (!text) return "";
  const lines = text.trim().split("\n");
  return lines[lines.length - 1];
}

window.addEventListener("resize", () => {
  if (view.history) renderCharts(view.history, serviceColors(view.status));
});
poll();
