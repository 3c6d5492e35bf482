// Usage: tokens, cost and sessions over 1 h, 24 h or 30 d, by model, key,
// outcome or identity, drawn with uPlot (vendored), with the same data as a
// table and as CSV.
import { el, fmtCost, getJSON } from "./common.js";

const form = document.getElementById("usage-form");
const state = document.getElementById("usage-state");
const csv = document.getElementById("csv");
const palette = ["#0b57d0", "#b3261e", "#116329", "#9a6700", "#6f42c1", "#0a7d8c", "#a0416f", "#57606a"];
const charts = {};
const labels = { model: "Model", key_id: "Key", outcome: "Outcome", identity: "Identity" };

function series(data, metric) {
  // One column per group, one row per bucket of the window (missing buckets are 0).
  const count = Math.round((data.until - data.since) / data.bucket_seconds) + 1;
  const xs = Array.from({ length: count }, (_, i) => data.since + i * data.bucket_seconds);
  const groups = [...new Set(data.rows.map((r) => String(r.group ?? "none")))].sort();
  const columns = groups.map(() => new Array(count).fill(0));
  for (const r of data.rows) {
    const i = Math.round((r.at - data.since) / data.bucket_seconds);
    if (i >= 0 && i < count) columns[groups.indexOf(String(r.group ?? "none"))][i] += metric(r);
  }
  return { xs, groups, columns };
}

function draw(id, data, metric, format) {
  const target = document.getElementById(id);
  const { xs, groups, columns } = series(data, metric);
  const width = Math.max(280, target.clientWidth || 600);
  const options = {
    width, height: 220,
    series: [{}, ...groups.map((g, i) => ({ label: g, stroke: palette[i % palette.length], width: 2, value: (u, v) => (v == null ? "—" : format(v)) }))],
    axes: [{}, { values: (u, ticks) => ticks.map(format), size: 70 }],
    legend: { live: true },
  };
  charts[id]?.destroy();
  target.replaceChildren();
  charts[id] = new uPlot(options, [xs, ...columns], target); // eslint-disable-line no-undef
}

function table(data) {
  const totals = new Map();
  for (const r of data.rows) {
    const key = String(r.group ?? "none");
    const t = totals.get(key) || { sessions: 0, prompt: 0, completion: 0, reasoning: 0, cost: 0 };
    t.sessions += r.sessions; t.prompt += r.prompt_tokens; t.completion += r.completion_tokens; t.reasoning += r.reasoning_tokens; t.cost += r.cost_usd;
    totals.set(key, t);
  }
  document.getElementById("group-head").textContent = labels[data.by];
  document.querySelector("#usage-table tbody").replaceChildren(...[...totals.entries()].sort().map(([group, t]) =>
    el("tr", {}, el("td", { text: group }), el("td", { class: "num", text: String(t.sessions) }), el("td", { class: "num", text: String(t.prompt) }),
      el("td", { class: "num", text: String(t.completion) }), el("td", { class: "num", text: String(t.reasoning) }), el("td", { class: "num", text: fmtCost(t.cost) }))));
  return totals.size;
}

async function load() {
  const params = new URLSearchParams(new FormData(form));
  csv.href = `/console/api/usage.csv?${params}`;
  state.textContent = "Loading…";
  const data = await getJSON(`/console/api/usage?${params}`);
  if (!data) return;
  const count = (v) => (Math.abs(v - Math.round(v)) < 1e-9 ? String(Math.round(v)) : v.toFixed(1));
  draw("chart-tokens", data, (r) => r.prompt_tokens + r.completion_tokens, count);
  draw("chart-cost", data, (r) => r.cost_usd, (v) => fmtCost(v));
  draw("chart-sessions", data, (r) => r.sessions, count);
  const groups = table(data);
  const sessions = data.rows.reduce((a, r) => a + r.sessions, 0);
  state.textContent = `${sessions} sessions in ${groups} ${groups === 1 ? "group" : "groups"}, in buckets of ${data.bucket_seconds >= 3600 ? data.bucket_seconds / 3600 + " h" : data.bucket_seconds / 60 + " min"}.`;
}

form.addEventListener("change", () => load().catch((error) => { state.textContent = error.message; }));
form.addEventListener("submit", (event) => event.preventDefault());
load().catch((error) => { state.textContent = error.message; });
