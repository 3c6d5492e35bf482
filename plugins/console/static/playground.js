// The playground: a chat streamed token by token from the console's own route
// (as the signed-in caller, with its key's limits), a stop button, usage, cost
// and time to first token afterwards, and the same request as curl or Python.
import { el, csrf, fmtCost, fmtMs, getJSON, post } from "./common.js";

const form = document.getElementById("play");
const send = document.getElementById("send");
const halt = document.getElementById("halt");
const answer = document.getElementById("answer");
const reasoning = document.getElementById("play-reasoning");
const reasoningBox = document.getElementById("play-reasoning-box");
const state = document.getElementById("play-state");
const snippet = document.getElementById("snippet");
let sessionId = null;
let controller = null;
let language = "curl";

function request() {
  const f = new FormData(form);
  const messages = [];
  if (f.get("system")) messages.push({ role: "system", content: f.get("system") });
  messages.push({ role: "user", content: f.get("user") });
  const body = { model: f.get("model"), messages };
  if (f.get("temperature") !== "") body.temperature = Number(f.get("temperature"));
  if (f.get("max_tokens") !== "") body.max_tokens = Number(f.get("max_tokens"));
  return body;
}

function showSnippet() {
  const body = { ...request(), stream: true };
  const base = `${location.origin}/v1`;
  if (language === "curl") {
    snippet.textContent = `curl -N ${base}/chat/completions \\\n  -H "Authorization: Bearer $STREAMVISOR_API_KEY" \\\n  -H "Content-Type: application/json" \\\n  -d '${JSON.stringify(body).replaceAll("'", "'\\''")}'`;
  } else {
    const args = [`model=${JSON.stringify(body.model)}`, `messages=${JSON.stringify(body.messages)}`];
    if (body.temperature !== undefined) args.push(`temperature=${body.temperature}`);
    if (body.max_tokens !== undefined) args.push(`max_tokens=${body.max_tokens}`);
    snippet.textContent = `import os\nfrom openai import OpenAI\n\nclient = OpenAI(base_url="${base}", api_key=os.environ["STREAMVISOR_API_KEY"])\nstream = client.chat.completions.create(\n    ${args.join(",\n    ")},\n    stream=True,\n)\nfor chunk in stream:\n    if chunk.choices:\n        print(chunk.choices[0].delta.content or "", end="", flush=True)\n`;
  }
}

function facts(s, ttft) {
  const usage = s.usage || {};
  const items = [["State", s.state + (s.finish_reason ? ` (${s.finish_reason})` : "")], ["Prompt tokens", usage.prompt_tokens ?? "—"],
    ["Completion tokens", usage.completion_tokens ?? "—"], ["Cost", fmtCost(usage.cost_usd)], ["Time to first token", fmtMs(ttft)],
    ["Duration", fmtMs(s.timings?.duration_ms)], ["Session", s.id]];
  if (s.error) items.push(["Error", s.error.message]);
  document.getElementById("play-facts").replaceChildren(...items.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: String(v) })]));
}

async function run(event) {
  event.preventDefault();
  answer.textContent = ""; reasoning.textContent = ""; reasoningBox.hidden = true;
  document.getElementById("play-facts").replaceChildren();
  send.disabled = true; halt.disabled = false; state.textContent = "Waiting for the first token…";
  controller = new AbortController();
  try {
    const response = await fetch("/console/api/chat", {
      method: "POST", credentials: "same-origin", signal: controller.signal,
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf() }, body: JSON.stringify(request()),
    });
    if (!response.ok) {
      const data = await response.json().catch(() => ({}));
      throw new Error(data?.error?.message || `HTTP ${response.status}`);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        if (!block.startsWith("data: ")) continue;
        const message = JSON.parse(block.slice(6));
        if (message.type === "start") { sessionId = message.session_id; state.textContent = `Streaming (${sessionId})`; }
        else if (message.type === "delta") {
          if (message.content) answer.append(message.content);
          if (message.reasoning) { reasoningBox.hidden = false; reasoning.append(message.reasoning); }
        } else if (message.type === "end") {
          facts(message.session, message.session.timings?.first_token_ms);
          state.textContent = `Done: ${message.session.state}${message.session.finish_reason ? ` (${message.session.finish_reason})` : ""}`;
        }
      }
    }
  } catch (error) {
    if (error.name !== "AbortError") state.textContent = `Error: ${error.message}`;
  } finally {
    send.disabled = false; halt.disabled = true; controller = null;
  }
}

halt.addEventListener("click", async () => {
  halt.disabled = true;
  if (sessionId) {
    try { await post(`/console/api/sessions/${encodeURIComponent(sessionId)}/stop`); } catch (error) { state.textContent = `Could not stop: ${error.message}`; }
  } else if (controller) controller.abort();
});

for (const button of document.querySelectorAll("[data-snippet]")) {
  button.addEventListener("click", () => {
    language = button.dataset.snippet;
    for (const b of document.querySelectorAll("[data-snippet]")) b.setAttribute("aria-pressed", String(b === button));
    showSnippet();
  });
}
form.addEventListener("input", showSnippet);
form.addEventListener("submit", run);

async function main() {
  const data = await getJSON("/console/api/models");
  if (!data) return;
  const select = document.getElementById("model");
  const models = data.providers.flatMap((p) => p.models);
  select.replaceChildren(...models.map((m) => el("option", { value: m, text: m })));
  showSnippet();
}

main().catch((error) => { state.textContent = error.message; });
