// The status page: polls /status (every 2 s) and /status/history (every 5 s) on this admin
// listener and renders them. Every value from the sidecar is inserted as text, never as HTML
// (client names and errors come from requests).
"use strict";

const STATUS_EVERY_MS = 2000;
const HISTORY_EVERY_MS = 5000;

// With an admin token: `/#token=...` (the fragment never leaves the browser).
function token() {
  const m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
  return m ? decodeURIComponent(m[1]) : "";
}

async function getJSON(path) {
  const headers = {};
  if (token()) headers["Authorization"] = "Bearer " + token();
  const resp = await fetch(path, { headers, cache: "no-store" });
  if (resp.status === 401) {
    document.getElementById("token-form").hidden = false;
    throw new Error("this sidecar has an admin token: enter it to see its status");
  }
  if (!resp.ok) throw new Error(path + " answered " + resp.status);
  return resp.json();
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

// Rows shown per table (a queue can hold a thousand waiters; the JSON has them all).
const MAX_ROWS = 200;

function table(id, head, rows, empty) {
  const t = document.getElementById(id);
  t.replaceChildren(el("tr", null, ...head.map(h => el("th", null, h))));
  const note = (text) => t.append(el("tr", null, el("td", { class: "empty", colspan: String(head.length) }, text)));
  if (rows.length === 0) note(empty);
  if (rows.length > MAX_ROWS) {
    note("showing " + MAX_ROWS + " of " + rows.length + " (all of them are in /status)");
    rows = rows.slice(0, MAX_ROWS);
  }
  for (const r of rows) t.append(el("tr", null, ...r.map(c => c instanceof Node && c.tagName === "TD" ? c : el("td", null, c))));
}

const num = (v) => el("td", { class: "num" }, v);

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 1) return "<1 s";
  if (seconds < 90) return Math.round(seconds) + " s";
  if (seconds < 5400) return Math.round(seconds / 60) + " min";
  return (seconds / 3600).toFixed(1) + " h";
}

function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

function badge(text, kind) { return el("span", { class: "badge " + kind }, text); }

function healthKind(h) {
  return h === "healthy" ? "ok" : (h === "starting" || h === "half_open") ? "warn" : "bad";
}

// used / limit as a bar (limit null: no limit).
function usage(used, limit) {
  if (!limit) return el("span", null, used + " ", el("span", { class: "muted" }, "(no limit)"));
  const share = Math.min(1, used / limit);
  const fill = el("span");
  fill.style.width = (share * 100).toFixed(0) + "%";
  return el("span", null, el("span", { class: "bar" + (share >= 1 ? " full" : "") }, fill), used + " / " + limit);
}

function renderStatus(s) {
  const ready = document.getElementById("ready");
  ready.replaceWith(Object.assign(badge(s.draining ? "draining" : s.ready ? "ready" : "not ready",
    s.ready && !s.draining ? "ok" : "bad"), { id: "ready" }));
  document.getElementById("summary").textContent =
    "v" + s.version + " · up " + ago(s.uptime_seconds) + " · " + s.in_flight + " in flight";
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();

  table("instances", ["instance", "health", "slots", "loaded models", "installed", "last check"],
    s.instances.map(i => {
      const check = i.last_check;
      const checkCell = el("td", null);
      if (check) {
        checkCell.append(badge(check.result, check.result === "success" ? "ok" : "bad"), " " + ago(check.seconds_ago) + " ago");
        if (check.error) checkCell.append(el("div", { class: "cause" }, check.error));
      } else {
        checkCell.append(el("span", { class: "muted" }, i.kind === "supervised" ? "by the supervisor" : "none yet"));
      }
      const health = el("td", null, badge(i.health, healthKind(i.health)),
        el("div", { class: "muted" }, i.state + " for " + ago(i.state_age_seconds)));
      // The last check's error says it already; other reasons (a name that does not resolve) here.
      if (i.reason && !(check && check.error)) health.append(el("div", { class: "cause" }, i.reason));
      const loaded = el("td", null);
      if (i.loaded_models.length === 0) loaded.append(el("span", { class: "muted" }, "none"));
      for (const m of i.loaded_models) {
        const mem = m.vram_bytes !== undefined && m.vram_bytes !== null
          ? " (" + bytes(m.vram_bytes) + " VRAM of " + bytes(m.size_bytes) + ")" : "";
        loaded.append(el("div", null, m.name + mem));
      }
      return [
        el("td", null, el("strong", null, i.name), el("div", { class: "muted" }, i.url + " · " + i.kind)),
        health,
        num((i.busy_slots ?? 0) + " / " + i.slots),
        loaded,
        el("td", null, i.installed_models.length ? i.installed_models.join(", ") : el("span", { class: "muted" }, "unknown")),
        checkCell,
      ];
    }), "no instances");

  const q = s.queue;
  document.getElementById("queue-summary").textContent =
    q.queued + " waiting from " + q.clients_queued + " client(s) · " + q.held_slots + " running · limit " +
    q.limits.max_queued + " · max wait " + ago(q.limits.max_wait_seconds);
  table("waiting", ["#", "client", "key", "model", "priority", "waiting for", "since"],
    q.waiting.map(w => [num(w.position), w.client, w.key ?? "–", w.model ?? "–", num(w.priority),
      num(ago(w.waited_seconds)), w.since ? new Date(w.since * 1000).toLocaleTimeString() : ""]),
    "nobody waits");

  table("keys", ["key", "queued", "requests / min", "tokens / min", "max concurrent"],
    s.keys.map(k => [k.name, num(k.queued), usage(k.requests_last_minute, k.limits.requests_per_minute),
      usage(k.tokens_last_minute, k.limits.tokens_per_minute), k.limits.max_concurrent ?? "no limit"]),
    "no API keys configured");

  table("refusals", ["when", "client", "key", "request", "status", "reason", "error"],
    s.recent_refusals.map(r => [new Date(r.at * 1000).toLocaleTimeString(), r.client, r.key ?? "–",
      r.method + " " + r.route + (r.model ? " · " + r.model : ""), num(r.status), r.reason, r.error ?? ""]),
    "no refusals since start");
}

const CHARTS = [
  ["queue depth", s => s.queued, v => String(v)],
  ["requests / s", s => s.requests_per_second, v => v.toFixed(2)],
  ["tokens / s", s => s.tokens_per_second, v => v.toFixed(1)],
  ["time to first token", s => s.ttft_seconds, v => (v * 1000).toFixed(0) + " ms"],
];

const SVG = "http://www.w3.org/2000/svg";

function chart(title, samples, pick, fmt) {
  const W = 300, H = 60;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", "0 0 " + W + " " + H);
  svg.setAttribute("preserveAspectRatio", "none");
  const base = document.createElementNS(SVG, "line");
  for (const [k, v] of [["x1", 0], ["x2", W], ["y1", H - 1], ["y2", H - 1]]) base.setAttribute(k, v);
  svg.append(base);
  const points = samples.map(s => [s.at, pick(s)]).filter(p => p[1] !== null && p[1] !== undefined);
  let last = "–";
  if (points.length > 0) {
    // The span of the samples kept (up to 15 min), at least a minute wide.
    const t1 = samples[samples.length - 1].at;
    const t0 = Math.min(t1 - 60, Math.max(t1 - 15 * 60, samples[0].at));
    const top = Math.max(...points.map(p => p[1]));
    const max = top > 0 ? top : 1;
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", points.map(([t, v]) =>
      ((t - t0) / (t1 - t0) * W).toFixed(1) + "," + (H - 2 - v / max * (H - 6)).toFixed(1)).join(" "));
    svg.append(line);
    last = fmt(points[points.length - 1][1]) + " (max " + fmt(top) + ")";
  }
  const span = samples.length ? ago(samples[samples.length - 1].at - samples[0].at) : "";
  return el("div", { class: "chart" }, el("div", { class: "title" }, title + (span ? " · " + span : ""),
    el("span", { class: "value" }, last)), svg);
}

function renderHistory(h) {
  document.getElementById("charts").replaceChildren(...CHARTS.map(([t, pick, fmt]) => chart(t, h.samples, pick, fmt)));
}

function showError(e) {
  const p = document.getElementById("error");
  p.textContent = e ? String(e.message || e) : "";
  p.hidden = !e;
}

async function pollStatus() {
  try { renderStatus(await getJSON("/status")); showError(null); } catch (e) { showError(e); }
  setTimeout(pollStatus, STATUS_EVERY_MS);
}

async function pollHistory() {
  try { renderHistory(await getJSON("/status/history")); } catch (e) { /* the status poll reports */ }
  setTimeout(pollHistory, HISTORY_EVERY_MS);
}

document.getElementById("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  location.hash = "token=" + encodeURIComponent(document.getElementById("token").value);
  document.getElementById("token-form").hidden = true;
});

pollStatus();
pollHistory();
