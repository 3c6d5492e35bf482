// A session's page: its facts, its timing, its request, and its output, which
// grows on screen while the session runs.
import { el, fmtCost, fmtMs, fmtTime, getJSON, post } from "./common.js";

const root = document.getElementById("session");
const id = root.dataset.session;
const output = document.getElementById("output");
const reasoning = document.getElementById("reasoning");
const reasoningBox = document.getElementById("reasoning-box");
const summary = document.getElementById("summary");
const stop = document.getElementById("stop");

function facts(s) {
  const dl = document.getElementById("facts");
  const usage = s.usage || {};
  const items = [
    ["State", s.state + (s.finish_reason ? ` (${s.finish_reason})` : "")], ["Model", s.model], ["Provider", s.provider],
    ["Identity", s.identity + (s.team ? ` (team ${s.team})` : "")], ["Key", s.key_id || "—"], ["Started", fmtTime(s.created)],
    ["Prompt tokens", usage.prompt_tokens ?? "—"], ["Completion tokens", usage.completion_tokens ?? "—"],
    ["Reasoning tokens", usage.completion_tokens_details?.reasoning_tokens ?? usage.reasoning_tokens ?? "—"],
    ["Cost", fmtCost(usage.cost_usd)], ["Counts", usage.exact === false ? "estimated" : "exact"],
    ["Background", s.background ? "yes" : "no"], ["Cache", s.headers?.["X-Cache"] || s.headers?.["x-cache"] || "—"],
  ];
  const events = s.events || [];
  const retries = events.filter((e) => e.type === "retry");
  const fallbacks = events.filter((e) => e.type === "fallback");
  const hit = events.find((e) => e.type === "cache_hit");
  items.push(["Retries", retries.length ? retries.map((e) => `${e.reason || e.error_type || "retry"}${e.status ? ` (${e.status})` : ""}`).join(", ") : "none"]);
  items.push(["Fallbacks", fallbacks.length ? fallbacks.map((e) => `${e.from_model} → ${e.to_model} (${e.reason})`).join(", ") : "none"]);
  if (hit) items.push(["Cache hit", `${hit.backend || ""} answer, ${hit.age_seconds ?? "?"} s old`]);
  if (s.error) items.push(["Error", `${s.error.message} (${s.error.code || s.error.type})`]);
  dl.replaceChildren(...items.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: String(v) })]));
}

function timing(t) {
  const bar = document.getElementById("timing");
  const total = t.duration_ms || 0;
  if (!total) { bar.replaceChildren(); return; }
  const started = t.started_ms || 0;
  const first = t.first_token_ms ?? total;
  const part = (cls, ms, label) => {
    const span = el("span", { class: cls, title: `${label}: ${fmtMs(ms)}`, text: `${label} ${fmtMs(ms)}` });
    span.style.width = `${Math.max(0.5, (ms / total) * 100)}%`; // CSSOM: allowed by the page's CSP
    return span;
  };
  bar.replaceChildren(part("queued", started, "queued"), part("waiting", Math.max(0, first - started), "first token"), part("streaming", Math.max(0, total - first), "streaming"));
  bar.setAttribute("aria-label", `Queued ${fmtMs(started)}, first token after ${fmtMs(t.first_token_ms)}, ${fmtMs(total)} in all`);
}

// Gaps between chunks, as this page saw them arrive (a live session only).
const arrivals = [];

function gaps() {
  const box = document.getElementById("gaps");
  if (arrivals.length < 3) { box.textContent = "Chunk gaps: measured while a session streams on this page."; return; }
  const g = arrivals.slice(1).map((t, i) => t - arrivals[i]).sort((a, b) => a - b);
  const pick = (q) => g[Math.min(g.length - 1, Math.floor(q * g.length))];
  box.textContent = `Chunk gaps seen here: median ${fmtMs(pick(0.5))}, p90 ${fmtMs(pick(0.9))}, longest ${fmtMs(g[g.length - 1])} (${g.length} gaps)`;
}

function show(s) {
  summary.textContent = `${s.state} · ${s.chunks} chunks · ${fmtMs(s.timings?.duration_ms)}`;
  facts(s);
  timing(s.timings || {});
  stop.hidden = !(s.state === "pending" || s.state === "running");
}

function messages(list) {
  const ol = document.getElementById("messages");
  if (!list) { ol.replaceChildren(el("li", { class: "muted", text: "The request is not kept for this session." })); return; }
  ol.replaceChildren(...list.map((m) => {
    const content = typeof m.content === "string" ? m.content
      : Array.isArray(m.content) ? m.content.map((p) => p.type === "text" ? p.text : `[${p.type}]`).join("\n") : JSON.stringify(m.content);
    return el("li", {}, el("span", { class: "role", text: m.role }), el("pre", { text: content ?? "" }));
  }));
}

stop.addEventListener("click", async () => {
  stop.disabled = true;
  try { await post(`/console/api/sessions/${encodeURIComponent(id)}/stop`); } catch (error) { summary.textContent = `Could not stop: ${error.message}`; stop.disabled = false; }
});

async function main() {
  const s = await getJSON(`/console/api/sessions/${encodeURIComponent(id)}`);
  if (!s) return;
  show(s);
  gaps();
  messages(s.messages);
  const source = new EventSource(`/console/api/sessions/${encodeURIComponent(id)}/stream`);
  source.onmessage = (event) => {
    const message = JSON.parse(event.data);
    if (message.type === "delta") {
      if (s.state === "running" || s.state === "pending") { arrivals.push(performance.now()); gaps(); }
      if (message.content) output.append(message.content);
      if (message.reasoning) { reasoningBox.hidden = false; reasoning.append(message.reasoning); }
    } else if (message.type === "end") {
      source.close();
      show({ ...message.session, events: s.events, headers: s.headers });
    } else if (message.type === "error") {
      source.close();
      summary.textContent = message.message;
    }
  };
  source.onerror = () => source.close();
}

main().catch((error) => { summary.textContent = error.message; });
