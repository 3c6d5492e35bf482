// The Live page: live sessions pushed over SSE (one message per server tick,
// every change of the tick in it), drawn at most once per animation frame, so
// a thousand sessions do not freeze the page; finished sessions move to the
// history table, which pages through the store.
import { el, fmtAge, fmtCost, fmtMs, fmtTime, getJSON, post, shortId } from "./common.js";

const rows = new Map();        // id -> live row data
let clockSkew = 0;             // server now - local now, seconds
let dirty = false;
const body = document.querySelector("#live tbody");
const count = document.getElementById("live-count");
const feedState = document.getElementById("feed-state");

function schedule() {
  if (!dirty) { dirty = true; requestAnimationFrame(draw); }
}

function liveRow(s) {
  const stop = el("button", { type: "button", class: "danger", "data-stop": s.id, "aria-label": `Stop session ${s.id}`, text: "Stop" });
  stop.addEventListener("click", async () => {
    stop.disabled = true;
    try { await post(`/console/api/sessions/${encodeURIComponent(s.id)}/stop`); }
    catch (error) { stop.disabled = false; feedState.textContent = `Could not stop ${s.id}: ${error.message}`; }
  });
  const tr = el("tr", { "data-id": s.id },
    el("td", {}, el("a", { href: `/console/sessions/${encodeURIComponent(s.id)}`, title: s.id, text: shortId(s.id) })),
    el("td", { text: s.model }), el("td", { text: s.identity }), el("td", { "data-col": "state" }),
    el("td", { class: "num", "data-col": "age" }), el("td", { class: "num", "data-col": "tokens" }),
    el("td", { class: "num", "data-col": "tps" }), el("td", { class: "num", "data-col": "ttft" }), el("td", {}, stop));
  return tr;
}

function fill(tr, s, now) {
  const cells = tr.querySelectorAll("[data-col]");
  const state = cells[0];
  state.textContent = s.state + (s.background ? " (background)" : "");
  state.className = `state-${s.state}`;
  cells[1].textContent = fmtAge(now - s.created_at);
  cells[2].textContent = String(s.tokens);
  cells[3].textContent = s.tps === null ? "—" : String(s.tps);
  cells[4].textContent = fmtMs(s.ttft_ms);
}

function draw() {
  dirty = false;
  const now = Date.now() / 1000 + clockSkew;
  const present = new Set();
  for (const tr of body.querySelectorAll("tr[data-id]")) {
    const s = rows.get(tr.dataset.id);
    if (!s) { tr.remove(); continue; }
    present.add(s.id);
    fill(tr, s, now);
  }
  for (const s of rows.values()) {
    if (present.has(s.id)) continue;
    const tr = liveRow(s);
    fill(tr, s, now);
    body.append(tr);
  }
  count.textContent = String(rows.size);
}

function historyRow(s) {
  return el("tr", { "data-id": s.id },
    el("td", {}, el("a", { href: `/console/sessions/${encodeURIComponent(s.id)}`, title: s.id, text: shortId(s.id) })),
    el("td", { text: s.model }), el("td", { text: s.identity }), el("td", { class: `state-${s.state}`, text: s.state }),
    el("td", { text: fmtTime(s.created_at) }), el("td", { class: "num", text: s.tokens ?? "—" }),
    el("td", { class: "num", text: fmtMs(s.duration_ms) }), el("td", { class: "num", text: fmtCost(s.cost_usd) }));
}

const history = document.querySelector("#history tbody");
const more = document.getElementById("more");
const filters = document.getElementById("filters");
let cursor = null;

function matches(s) {
  const f = new FormData(filters);
  return (!f.get("state") || f.get("state") === s.state) && (!f.get("model") || f.get("model") === s.model)
    && (!f.get("identity") || f.get("identity") === s.identity);
}

async function loadHistory(reset) {
  const params = new URLSearchParams();
  for (const [key, value] of new FormData(filters)) if (value) params.set(key, value);
  if (!reset && cursor) params.set("after", cursor);
  const data = await getJSON(`/console/api/history?${params}`);
  if (!data) return;
  if (reset) history.replaceChildren();
  for (const s of data.data) if (!history.querySelector(`tr[data-id="${CSS.escape(s.id)}"]`)) history.append(historyRow(s));
  cursor = data.next;
  more.hidden = !cursor;
}

function ended(list) {
  for (const s of list) {
    rows.delete(s.id);
    if (matches(s) && !history.querySelector(`tr[data-id="${CSS.escape(s.id)}"]`)) history.prepend(historyRow(s));
  }
}

function connect() {
  const source = new EventSource("/console/api/feed");
  source.onopen = () => { feedState.textContent = "Live: updates are pushed as they happen."; };
  source.onerror = () => { feedState.textContent = "Disconnected; reconnecting…"; };
  source.onmessage = (event) => {
    const message = JSON.parse(event.data);
    clockSkew = message.now - Date.now() / 1000;
    if (message.type === "snapshot") {
      rows.clear();
      for (const s of message.sessions) rows.set(s.id, s);
    } else {
      for (const s of message.upsert) rows.set(s.id, s);
    }
    if (message.ended) ended(message.ended);
    schedule();
  };
}

filters.addEventListener("submit", (event) => { event.preventDefault(); loadHistory(true); });
more.addEventListener("click", () => loadHistory(false));
setInterval(schedule, 1000); // ages move on between messages
connect();
loadHistory(true);
