// The Tollgate dashboard: every panel is a query on the public API
// (/v1/sql, /v1/reports/roi, /v1/alerts) made with the key the page is
// signed in with, so a consumer key sees only its own rows. No build step,
// no network beyond this service.
"use strict";

const $ = (s) => document.querySelector(s);
const KEY = "tollgate.token";
const state = { token: sessionStorage.getItem(KEY), charts: {}, rows: {}, load: 0 };

// ---- the API, a few requests at a time (the service runs a bounded number
// of queries at once and answers 429 past it).
const MAX_INFLIGHT = 3;
let inflight = 0;
const waiting = [];
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, body) {
  while (inflight >= MAX_INFLIGHT) await new Promise((r) => waiting.push(r));
  inflight++;
  try {
    for (let attempt = 0; ; attempt++) {
      const init = { headers: { Authorization: "Bearer " + state.token } };
      if (body !== undefined) {
        init.method = "POST";
        init.headers["Content-Type"] = "application/json";
        init.body = JSON.stringify(body);
      }
      const r = await fetch(path, init);
      if (r.status === 429 && attempt < 10) { await sleep(200 * (attempt + 1)); continue; }
      const data = await r.json().catch(() => ({}));
      if (!r.ok) throw new ApiError(r.status, (data.error && data.error.message) || r.statusText);
      return data;
    }
  } finally {
    inflight--;
    const next = waiting.shift();
    if (next) next();
  }
}
const sql = (query) => api("/v1/sql", { query });

// ---- the time range and the filters every panel follows.
const quote = (s) => "'" + String(s).replace(/'/g, "''") + "'";
const MODEL = "coalesce(served_model, requested_model)";

// The window of the current refresh: fixed while its panels load, so every
// panel reads the same rows.
function range() {
  return state.window || pickRange();
}

// What the controls ask for, or why they cannot be used.
function problem() {
  if ($("#range").value === "custom") {
    const from = new Date($("#from").value), to = new Date($("#to").value);
    if (isNaN(from) || isNaN(to)) return "Give a custom range a start and an end.";
    if (from >= to) return "The range must start before it ends.";
    if (from.getUTCFullYear() < 1970 || to.getUTCFullYear() > 2200) return "Keep the range between 1970 and 2200.";
  }
  const tag = $("#f-tag").value.trim();
  if (tag && !(tag.indexOf("=") > 0)) return "Write the tag filter as key=value.";
  return null;
}

function pickRange() {
  const v = $("#range").value;
  if (v === "custom") {
    const from = new Date($("#from").value), to = new Date($("#to").value);
    if (!isNaN(from) && !isNaN(to) && from < to) return { from, to };
  }
  const to = new Date(Math.ceil(Date.now() / 60000) * 60000);
  const hours = v === "custom" ? 24 : Number(v);
  return { from: new Date(to - hours * 3600e3), to };
}

function filters() {
  const tag = $("#f-tag").value.trim();
  const eq = tag.indexOf("=");
  return {
    consumer: $("#f-consumer").value, team: $("#f-team").value, model: $("#f-model").value,
    tag: eq > 0 ? [tag.slice(0, eq).trim(), tag.slice(eq + 1).trim()] : null,
  };
}

const day = (d) => d.toISOString().slice(0, 10);
const ts = (d) => d.toISOString();

// The WHERE clause of the range (pruned by the lake's date directories) and
// the filters; `withFilters` false for the filter menus themselves.
function where(withFilters = true) {
  const { from, to } = range();
  const p = [`ts_start >= TIMESTAMP ${quote(ts(from))}`, `ts_start < TIMESTAMP ${quote(ts(to))}`,
    `date >= DATE ${quote(day(from))}`, `date <= DATE ${quote(day(to))}`];
  if (withFilters) {
    const f = filters();
    if (f.consumer) p.push(`consumer = ${quote(f.consumer)}`);
    if (f.team) p.push(`team = ${quote(f.team)}`);
    if (f.model) p.push(`${MODEL} = ${quote(f.model)}`);
    if (f.tag) p.push(`array_element(map_extract(tags, ${quote(f.tag[0])}), 1) = ${quote(f.tag[1])}`);
  }
  return " WHERE " + p.join(" AND ");
}

// The same window and filters as report parameters.
function reportParams() {
  const { from, to } = range();
  const q = new URLSearchParams({ from: ts(from), to: ts(to) });
  const f = filters();
  if (f.consumer) q.set("consumer", f.consumer);
  if (f.team) q.set("team", f.team);
  if (f.model) q.set("model", f.model);
  if (f.tag) q.set("tag", f.tag[0] + "=" + f.tag[1]);
  return q;
}

function bucket() {
  const { from, to } = range();
  const hours = (to - from) / 3600e3;
  return hours <= 3 ? "minute" : hours <= 72 ? "hour" : "day";
}

// ---- rendering
const num = (v) => (v === null || v === undefined || v === "" ? 0 : Number(v));
const usd = (v) => "$" + num(v).toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: num(v) < 1 ? 6 : 2 });
const pct = (v) => (num(v) * 100).toFixed(1) + "%";
const int = (v) => Math.round(num(v)).toLocaleString("en-US");
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

function panel(id) { return document.querySelector(`[data-panel="${id}"]`); }

function mark(id, s, rows, message) {
  const p = panel(id);
  p.dataset.state = s;
  if (rows !== undefined) p.dataset.rows = String(rows);
  let m = p.querySelector(".message");
  if (message) {
    if (!m) { m = document.createElement("p"); m.className = "message"; p.appendChild(m); }
    m.textContent = message;
  } else if (m) m.remove();
}

function chart(id) {
  if (!state.charts[id]) state.charts[id] = echarts.init(document.getElementById(id));
  return state.charts[id];
}

// A time series per key, stacked: rows of {t, k, v}.
// The time axis of the range, so a quiet stretch shows as quiet.
function timeAxis() {
  const { from, to } = range();
  return { type: "time", min: from.getTime(), max: to.getTime() };
}

function stacked(id, rows, money) {
  const times = [...new Set(rows.map((r) => r.t))].sort();
  const keys = [...new Set(rows.map((r) => r.k ?? "(none)"))];
  const at = new Map(rows.map((r) => [r.t + "\u0000" + (r.k ?? "(none)"), num(r.v)]));
  chart(id).setOption({
    tooltip: { trigger: "axis", valueFormatter: money ? usd : int },
    legend: { top: 0 },
    grid: { left: 60, right: 16, top: 30, bottom: 30 },
    xAxis: timeAxis(),
    yAxis: { type: "value", axisLabel: { formatter: money ? (v) => "$" + v : undefined } },
    series: keys.map((k) => ({
      name: k, type: "line", stack: "total", areaStyle: {}, showSymbol: times.length < 4,
      data: times.map((t) => [t, at.get(t + "\u0000" + k) ?? 0]),
    })),
  }, true);
}

function lines(id, rows, series, axes) {
  chart(id).setOption({
    tooltip: { trigger: "axis" },
    legend: { top: 0 },
    grid: { left: 60, right: 60, top: 30, bottom: 30 },
    xAxis: timeAxis(),
    yAxis: axes || { type: "value" },
    series: series.map((s) => ({
      name: s.name, type: s.type || "line", yAxisIndex: s.axis || 0, showSymbol: rows.length < 4, barMaxWidth: 18,
      data: rows.map((r) => [r.t, r[s.key] === null ? null : num(r[s.key])]),
    })),
  }, true);
}

function table(id, rows, columns) {
  state.rows[id] = { rows, columns };
  const el = document.getElementById(id);
  const head = columns.map((c) => `<th class="${c.num ? "num" : ""}">${esc(c.title)}</th>`).join("");
  const body = rows.map((r) => "<tr>" + columns.map((c) => {
    const v = r[c.key];
    const shown = c.html ? c.html(r) : esc(c.fmt ? c.fmt(v, r) : v);
    return `<td class="${c.num ? "num" : ""}">${shown}</td>`;
  }).join("") + "</tr>").join("");
  el.innerHTML = `<button type="button" class="csv" data-csv="${id}">CSV</button>` +
    `<table><thead><tr>${head}</tr></thead><tbody>${body}</tbody></table>` +
    (rows.length ? "" : `<p class="hint">Nothing in this range.</p>`);
}

function stats(id, items) {
  document.getElementById(id).innerHTML = items.map(([label, value, cls]) =>
    `<div class="stat"><b class="${cls || ""}" data-stat="${esc(label)}">${esc(value)}</b><span>${esc(label)}</span></div>`).join("");
}

function csv(id) {
  const { rows, columns } = state.rows[id] || { rows: [], columns: [] };
  const cell = (v) => {
    let s = v === null || v === undefined ? "" : typeof v === "object" ? JSON.stringify(v) : String(v);
    // A cell a spreadsheet would run as a formula is kept as text.
    if (/^[=+\-@\t\r]/.test(s) && !/^-?\d+(\.\d+)?$/.test(s)) s = "'" + s;
    return /[",\n\r]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  };
  const text = [columns.map((c) => cell(c.key)).join(",")]
    .concat(rows.map((r) => columns.map((c) => cell(r[c.key])).join(","))).join("\r\n") + "\r\n";
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([text], { type: "text/csv" }));
  a.download = `tollgate-${id}.csv`;
  document.body.appendChild(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
}

// The ROI report with the what-if's parameters: one call serves both the
// thinking tax and the what-if panels of a refresh.
function whatIfParams() {
  const from = $("#wi-from").value, to = $("#wi-to").value;
  const q = reportParams();
  if (from && to && from !== to) q.set("reprice", `${from}:${to}`);
  const gpu = $("#wi-gpu").value, gpus = $("#wi-gpus").value, tps = $("#wi-tps").value;
  if (gpu) q.set("gpu_hour_usd", gpu);
  if (gpus) q.set("gpus", gpus);
  if (tps) q.set("tokens_per_s", tps);
  return q;
}

function roi(fresh) {
  if (fresh || !state.roi || state.roi.load !== state.load) {
    const q = whatIfParams();
    state.roi = { load: state.load, q, report: api("/v1/reports/roi?" + q) };
  }
  return state.roi;
}

// ---- the panels: each loads its data and renders it.
const PANELS = {
  async summary() {
    const [r] = await sql(`SELECT count(*) AS requests, sum(cost_usd) AS cost_usd, sum(input_tokens) AS input_tokens,
      sum(output_tokens) AS output_tokens, avg(CASE WHEN status >= 400 THEN 1.0 ELSE 0.0 END) AS error_rate
      FROM usage${where()}`);
    stats("summary", [["Requests", int(r.requests)], ["Spend", usd(r.cost_usd)], ["Input tokens", int(r.input_tokens)],
      ["Output tokens", int(r.output_tokens)], ["Error rate", pct(r.error_rate)]]);
    document.getElementById("summary").dataset.costUsd = r.cost_usd ?? "0";
    document.getElementById("summary").dataset.requests = String(r.requests);
    return 1;
  },
  async "spend-model"() {
    const rows = await sql(`SELECT date_trunc('${bucket()}', ts_start) AS t, ${MODEL} AS k, sum(cost_usd) AS v
      FROM usage${where()} GROUP BY 1, 2 ORDER BY 1`);
    stacked("spend-model", rows, true);
    return rows.length;
  },
  async "spend-team"() {
    const rows = await sql(`SELECT date_trunc('${bucket()}', ts_start) AS t, coalesce(team, '(no team)') AS k,
      sum(cost_usd) AS v FROM usage${where()} GROUP BY 1, 2 ORDER BY 1`);
    stacked("spend-team", rows, true);
    return rows.length;
  },
  async "top-consumers"() {
    const rows = await sql(`SELECT coalesce(consumer, '(none)') AS consumer, coalesce(team, '') AS team,
      count(*) AS requests, sum(input_tokens + output_tokens) AS tokens, sum(cost_usd) AS cost_usd
      FROM usage${where()} GROUP BY 1, 2 ORDER BY cost_usd DESC, 1 LIMIT 20`);
    table("top-consumers", rows, [{ key: "consumer", title: "Consumer" }, { key: "team", title: "Team" },
      { key: "requests", title: "Requests", num: true, fmt: int }, { key: "tokens", title: "Tokens", num: true, fmt: int },
      { key: "cost_usd", title: "Cost", num: true, fmt: usd }]);
    return rows.length;
  },
  async "top-teams"() {
    const rows = await sql(`SELECT coalesce(team, '(no team)') AS team, count(DISTINCT consumer) AS consumers,
      count(*) AS requests, sum(cost_usd) AS cost_usd FROM usage${where()} GROUP BY 1 ORDER BY cost_usd DESC, 1 LIMIT 20`);
    table("top-teams", rows, [{ key: "team", title: "Team" }, { key: "consumers", title: "Consumers", num: true, fmt: int },
      { key: "requests", title: "Requests", num: true, fmt: int }, { key: "cost_usd", title: "Cost", num: true, fmt: usd }]);
    return rows.length;
  },
  async "top-tags"() {
    const rows = await sql(`SELECT t.key AS tag, t.value AS value, count(*) AS requests, sum(cost_usd) AS cost_usd
      FROM (SELECT cost_usd, unnest(map_entries(tags)) AS t FROM usage${where()}) GROUP BY 1, 2
      ORDER BY cost_usd DESC, 1, 2 LIMIT 20`);
    table("top-tags", rows, [{ key: "tag", title: "Tag" }, { key: "value", title: "Value" },
      { key: "requests", title: "Requests", num: true, fmt: int }, { key: "cost_usd", title: "Cost", num: true, fmt: usd }]);
    return rows.length;
  },
  async budgets() {
    const [rows, forecasts] = await Promise.all([
      sql(`SELECT name, team, consumer, model, period, usd, spent_usd, remaining_usd, spent_fraction, period_start, period_end
        FROM budgets ORDER BY spent_fraction DESC, name`),
      api("/v1/alerts?kind=forecast&limit=1000"),
    ]);
    const f = filters();
    const shown = rows.filter((b) => (!f.team || !b.team || b.team === f.team) && (!f.consumer || !b.consumer || b.consumer === f.consumer));
    for (const b of shown) {
      const latest = forecasts.data.find((a) => a.name === b.name && a.period_start && Date.parse(a.period_start) === Date.parse(b.period_start));
      b.projected_usd = latest ? latest.projected_usd : null;
      b.exhaustion_at = latest ? latest.exhaustion_at : null;
      b.forecast_at = latest ? latest.fired_at : null;
    }
    const bar = (b) => {
      const share = num(b.spent_fraction);
      const cls = share >= 1 ? "over" : share >= 0.8 ? "warn" : "";
      return `<span class="bar ${cls}"><i style="width:${Math.min(100, share * 100).toFixed(1)}%"></i></span> ${pct(share)}`;
    };
    table("budgets", shown, [{ key: "name", title: "Budget" }, { key: "team", title: "Team" }, { key: "model", title: "Model" },
      { key: "period", title: "Period" }, { key: "spent_usd", title: "Spent", num: true, fmt: usd },
      { key: "usd", title: "Budget", num: true, fmt: usd }, { key: "spent_fraction", title: "Used", html: bar },
      { key: "projected_usd", title: "Projected at period end", num: true, fmt: (v) => (v === null ? "on track" : usd(v)) },
      { key: "exhaustion_at", title: "Runs out", fmt: (v) => (v ? new Date(v).toLocaleString() : "") },
      { key: "forecast_at", title: "Forecast made", fmt: (v) => (v ? new Date(v).toLocaleString() : "") }]);
    return shown.length;
  },
  async requests() {
    const rows = await sql(`SELECT date_trunc('${bucket()}', ts_start) AS t, count(*) AS requests,
      avg(CASE WHEN status >= 400 THEN 1.0 ELSE 0.0 END) AS error_rate FROM usage${where()} GROUP BY 1 ORDER BY 1`);
    lines("requests", rows, [{ name: "requests", key: "requests", type: "bar" }, { name: "error rate", key: "error_rate", axis: 1 }],
      [{ type: "value", name: "requests" }, { type: "value", name: "errors", max: 1, axisLabel: { formatter: (v) => v * 100 + "%" } }]);
    return rows.length;
  },
  async latency() {
    const rows = await sql(`SELECT date_trunc('${bucket()}', ts_start) AS t,
      approx_percentile_cont(latency_ms, 0.5) AS p50, approx_percentile_cont(latency_ms, 0.95) AS p95,
      approx_percentile_cont(ttft_ms, 0.5) AS ttft_p50, approx_percentile_cont(ttft_ms, 0.95) AS ttft_p95
      FROM usage${where()} GROUP BY 1 ORDER BY 1`);
    lines("latency", rows, [{ name: "latency p50", key: "p50" }, { name: "latency p95", key: "p95" },
      { name: "TTFT p50", key: "ttft_p50" }, { name: "TTFT p95", key: "ttft_p95" }],
    { type: "value", name: "ms" });
    return rows.length;
  },
  async "tokens-per-s"() {
    const rows = await sql(`SELECT ${MODEL} AS model,
      sum(output_tokens) / sum(greatest(latency_ms - coalesce(ttft_ms, 0), 1) / 1000.0) AS tps
      FROM usage${where()} AND output_tokens > 0 AND status < 400 GROUP BY 1 ORDER BY 2 DESC`);
    chart("tokens-per-s").setOption({
      tooltip: {}, grid: { left: 90, right: 16, top: 10, bottom: 30 },
      xAxis: { type: "value", name: "tokens/s" }, yAxis: { type: "category", data: rows.map((r) => r.model) },
      series: [{ type: "bar", data: rows.map((r) => Number(num(r.tps).toFixed(1))) }],
    }, true);
    return rows.length;
  },
  async cache() {
    const [r] = await sql(`SELECT count(*) AS requests, sum(CASE WHEN cache = 'hit' THEN 1 ELSE 0 END) AS hits,
      sum(CASE WHEN cache_kind = 'semantic' AND cache = 'hit' THEN 1 ELSE 0 END) AS semantic_hits,
      coalesce(sum(cost_saved_usd), 0) AS saved FROM usage${where()}`);
    const rate = num(r.requests) ? num(r.hits) / num(r.requests) : 0;
    stats("cache", [["Hit rate", pct(rate)], ["Hits", int(r.hits)], ["Semantic hits", int(r.semantic_hits)], ["Money saved", usd(r.saved)]]);
    return 1;
  },
  async fallbacks() {
    const rows = await sql(`SELECT CASE WHEN fallback THEN coalesce(fallback_reason, 'unknown') ELSE '-' END AS reason,
      count(*) AS n FROM usage${where()} GROUP BY 1 ORDER BY 2 DESC`);
    const total = rows.reduce((s, r) => s + num(r.n), 0);
    const fell = rows.filter((r) => r.reason !== "-");
    const share = total ? fell.reduce((s, r) => s + num(r.n), 0) / total : 0;
    chart("fallbacks").setOption({
      title: { text: pct(share) + " fell back", left: "center", top: 0, textStyle: { fontSize: 13 } },
      tooltip: { trigger: "item" },
      series: [{ type: "pie", radius: ["35%", "65%"], top: 20, data: fell.map((r) => ({ name: r.reason, value: num(r.n) })) }],
    }, true);
    return rows.length;
  },
  async "rate-limited"() {
    const rows = await sql(`SELECT date_trunc('${bucket()}', ts_start) AS t,
      sum(CASE WHEN rate_limited AND status < 400 THEN 1 ELSE 0 END) AS rerouted,
      sum(CASE WHEN outcome IN ('rate_limited', 'budget_exceeded') THEN 1 ELSE 0 END) AS refused
      FROM usage${where()} GROUP BY 1 ORDER BY 1`);
    lines("rate-limited", rows, [{ name: "served by a fallback", key: "rerouted", type: "bar" },
      { name: "refused (429)", key: "refused", type: "bar" }]);
    return rows.length;
  },
  async thinking() {
    const report = await roi().report;
    const rows = report.rows.filter((r) => num(r.thinking_tax_usd) > 0 || num(r.cost_usd) > 0);
    table("thinking", rows, [{ key: "consumer", title: "Consumer" }, { key: "model", title: "Model" },
      { key: "cost_usd", title: "Cost", num: true, fmt: usd }, { key: "thinking_tax_usd", title: "Reasoning tokens' cost", num: true, fmt: usd },
      { key: "thinking_share_of_cost", title: "Share of cost", num: true, fmt: pct }]);
    return rows.length;
  },
  async "what-if"(fresh) {
    const { q, report: pending } = roi(fresh);
    const report = await pending;
    const [from, to] = (q.get("reprice") || ":").split(":");
    let actual = 0, repriced = 0, alt = 0;
    for (const r of report.rows) {
      actual += num(r.cost_usd);
      if (r.repriced) { repriced += num(r.cost_usd); alt += num(r.repriced.cost_usd); }
    }
    const items = [["Actual cost", usd(actual)]];
    if (q.has("reprice")) {
      items.push([`${from} traffic`, usd(repriced)], [`on ${to}`, usd(alt)], ["Saving", usd(repriced - alt)]);
    }
    const sh = report.self_host || (report.params && report.params.self_host);
    if (sh) {
      items.push(["Self-hosted $/1M output tokens", sh.self_host_cost_per_million_output_tokens_usd ? usd(sh.self_host_cost_per_million_output_tokens_usd) : "n/a"],
        ["API $/1M output tokens", sh.api_cost_per_million_output_tokens_usd ? usd(sh.api_cost_per_million_output_tokens_usd) : "n/a"],
        ["Break-even output tokens/month", sh.break_even_output_tokens_per_month ? int(sh.break_even_output_tokens_per_month) : "n/a"]);
    }
    stats("what-if", items);
    return report.rows.length;
  },
  async alerts() {
    const { from } = range();
    const list = await api(`/v1/alerts?limit=100&since=${encodeURIComponent(ts(from))}`);
    const f = filters();
    const { to } = range();
    const rows = list.data.filter((a) => Date.parse(a.fired_at) < to.getTime()
      && (!f.consumer || !a.consumer || a.consumer === f.consumer) && (!f.model || !a.model || a.model === f.model));
    table("alerts", rows, [{ key: "fired_at", title: "When", fmt: (v) => new Date(v).toLocaleString() },
      { key: "kind", title: "Kind" }, { key: "status", title: "Status", html: (r) => `<span class="${esc(r.status)}">${esc(r.status)}</span>` },
      { key: "message", title: "Message" }]);
    return rows.length;
  },
  async pipeline() {
    const now = new Date();
    const since = new Date(now - 3600e3);
    const [[fresh], pipe] = await Promise.all([
      sql(`SELECT max(ts_end) AS latest, count(*) AS last_hour FROM usage WHERE date >= DATE ${quote(day(since))}
        AND ts_start >= TIMESTAMP ${quote(ts(since))}`),
      api("/v1/alerts?kind=pipeline&limit=1000"),
    ]);
    const open = new Map();
    for (const a of [...pipe.data].reverse()) open.set(a.name, a.status);
    const firing = [...open.values()].filter((s) => s === "firing").length;
    const age = fresh.latest ? Math.max(0, (now - new Date(fresh.latest)) / 1000) : null;
    stats("pipeline", [["Newest event in the lake", age === null ? "none in the last hour" : age.toFixed(0) + " s ago"],
      ["Events in the last hour", int(fresh.last_hour)],
      ["Pipeline alerts firing", String(firing), firing ? "firing" : ""]]);
    return 1;
  },
};

async function refresh() {
  const load = ++state.load;
  const started = performance.now();
  state.window = pickRange();
  $("#status").textContent = "loading…";
  await Promise.all(Object.entries(PANELS).map(async ([id, loadPanel]) => {
    mark(id, "loading");
    const t0 = performance.now();
    try {
      const rows = await loadPanel();
      panel(id).dataset.ms = String(Math.round(performance.now() - t0));
      if (load === state.load) mark(id, "ready", rows);
    } catch (e) {
      if (e.status === 401) return signOut(e.message);
      if (load === state.load) {
        const body = panel(id).querySelector(".chart, .table, .stats");
        if (state.charts[body.id]) state.charts[body.id].clear(); else body.innerHTML = "";
        mark(id, "error", 0, e.message);
      }
    }
  }));
  if (load === state.load) {
    const ms = Math.round(performance.now() - started);
    const { from, to } = range();
    document.body.dataset.from = ts(from);
    document.body.dataset.to = ts(to);
    document.body.dataset.rendered = String(load);
    document.body.dataset.renderMs = String(ms);
    $("#status").textContent = `updated ${new Date().toLocaleTimeString()} in ${ms} ms`;
  }
}

// The filter menus: what the range holds, before filtering.
async function menus() {
  state.window = null;
  const w = where(false);
  const [consumers, teams, models, requested, prices] = await Promise.all([
    sql(`SELECT DISTINCT consumer AS v FROM usage${w} AND consumer IS NOT NULL ORDER BY 1 LIMIT 500`),
    sql(`SELECT DISTINCT team AS v FROM usage${w} AND team IS NOT NULL ORDER BY 1 LIMIT 500`),
    sql(`SELECT DISTINCT ${MODEL} AS v FROM usage${w} AND ${MODEL} IS NOT NULL ORDER BY 1 LIMIT 500`),
    sql(`SELECT DISTINCT requested_model AS v FROM usage${w}
      AND requested_model IN (SELECT name FROM prices) ORDER BY 1 LIMIT 500`),
    sql(`SELECT DISTINCT name AS v FROM prices WHERE effective_to IS NULL ORDER BY 1`),
  ]);
  const fill = (sel, rows, all) => {
    const keep = sel.value;
    sel.innerHTML = (all ? `<option value="">All</option>` : "") + rows.map((r) => `<option>${esc(r.v)}</option>`).join("");
    if ([...sel.options].some((o) => o.value === keep)) sel.value = keep;
  };
  fill($("#f-consumer"), consumers, true);
  fill($("#f-team"), teams, true);
  fill($("#f-model"), models, true);
  // Reprice what clients asked for; the models already in use first.
  const used = requested.map((r) => r.v);
  fill($("#wi-from"), requested, false);
  fill($("#wi-to"), requested.concat(prices.filter((r) => !used.includes(r.v))), false);
  if ($("#wi-to").value === $("#wi-from").value && $("#wi-to").options.length > 1) $("#wi-to").selectedIndex = 1;
}

function signOut(message) {
  sessionStorage.removeItem(KEY);
  state.token = null;
  $("#app").hidden = true;
  $("#signout").hidden = true;
  $("#who").textContent = "";
  $("#signin").hidden = false;
  $("#signin-error").textContent = message || "";
}

async function start() {
  $("#signin").hidden = true;
  $("#app").hidden = false;
  $("#signout").hidden = false;
  try {
    await menus();
  } catch (e) {
    if (e.status === 401 || e.status === 403) return signOut(e.message);
    $("#status").textContent = e.message;
  }
  $("#who").textContent = "signed in";
  await refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  $("#signin-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const token = $("#token").value.trim();
    $("#token").value = "";
    if (!/^[\x21-\x7e]+$/.test(token)) {
      $("#signin-error").textContent = "A token or key is printable ASCII without spaces.";
      return;
    }
    state.token = token;
    sessionStorage.setItem(KEY, state.token);
    start();
  });
  $("#signout").addEventListener("click", () => signOut());
  $("#range").addEventListener("change", () => $("#controls").classList.toggle("custom", $("#range").value === "custom"));
  $("#controls").addEventListener("submit", async (e) => {
    e.preventDefault();
    const wrong = problem();
    if (wrong) { $("#status").textContent = wrong; $("#status").classList.add("error"); return; }
    $("#status").classList.remove("error");
    await menus().catch(() => {});
    refresh();
  });
  $("#what-if-form").addEventListener("submit", (e) => {
    e.preventDefault();
    mark("what-if", "loading");
    PANELS["what-if"](true).then((n) => mark("what-if", "ready", n), (err) => mark("what-if", "error", 0, err.message));
  });
  document.addEventListener("click", (e) => { const id = e.target.dataset && e.target.dataset.csv; if (id) csv(id); });
  window.addEventListener("resize", () => Object.values(state.charts).forEach((c) => c.resize()));
  if (state.token) start(); else signOut();
});
