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
  messages(s.messages);
  const source = new EventSource(`/console/api/sessions/${encodeURIComponent(id)}/stream`);
  source.onmessage = (event) => {
    const message = JSON.parse(event.data);
    if (message.type === "delta") {
      if (message.content) output.append(message.content);
      if (message.reasoning) { reasoningBox.hidden = false; reasoning.append(message.reasoning); }
    } else if (message.type === "end") {
      source.close();
      show(message.session);
    } else if (message.type === "error") {
      source.close();
      summary.textContent = message.message;
    }
  };
  source.onerror = () => source.close();
}

main().catch((error) => { summary.textContent = error.message; });
