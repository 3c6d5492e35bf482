// The Live page: live sessions pushed over SSE (one message per server tick,
// every change of the tick in it), drawn at most once per animation frame, so
// a thousand sessions do not freeze the page; finished sessions move to the
// history table, which pages through the store.
import { el, fmtAge, fmtCost, fmtMs, fmtTime, getJSON, post, shortId } from "./common.js";

const rows = new Map();        // id -> live row data
const drawn = new Map();       // id -> {tr, state, age, tokens, tps, ttft}: the row on screen and its cells
const changed = new Set();     // ids whose data changed since the last frame
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
  const cells = {
    state: el("td", { "data-col": "state" }), age: el("td", { class: "num", "data-col": "age" }),
    tokens: el("td", { class: "num", "data-col": "tokens" }), tps: el("td", { class: "num", "data-col": "tps" }),
    ttft: el("td", { class: "num", "data-col": "ttft" }),
  };
  cells.tr = el("tr", { "data-id": s.id },
    el("td", {}, el("a", { href: `/console/sessions/${encodeURIComponent(s.id)}`, title: s.id, text: shortId(s.id) })),
    el("td", { text: s.model }), el("td", { text: s.identity }), cells.state, cells.age, cells.tokens, cells.tps, cells.ttft, el("td", {}, stop));
  return cells;
}

// Only what differs is written: a thousand rows cost a thousand comparisons,
// not a thousand layouts.
function set(cell, text) { if (cell.textContent !== text) cell.textContent = text; }

function fill(cells, s) {
  set(cells.state, s.state + (s.background ? " (background)" : ""));
  const cls = `state-${s.state}`;
  if (cells.state.className !== cls) cells.state.className = cls;
  set(cells.tokens, String(s.tokens));
  set(cells.tps, s.tps === null ? "—" : String(s.tps));
  set(cells.ttft, fmtMs(s.ttft_ms));
}

let agesAt = 0;

function draw(now) {
  dirty = false;
  const added = [];
  for (const id of changed) {
    const s = rows.get(id);
    let cells = drawn.get(id);
    if (!s) { if (cells) { cells.tr.remove(); drawn.delete(id); } continue; }
    if (!cells) { cells = liveRow(s); drawn.set(id, cells); added.push(cells.tr); set(cells.age, fmtAge(Date.now() / 1000 + clockSkew - s.created_at)); }
    fill(cells, s);
  }
  changed.clear();
  if (added.length) body.append(...added);
  if (now - agesAt > 1000) {   // ages move on once a second
    agesAt = now;
    const at = Date.now() / 1000 + clockSkew;
    for (const [id, cells] of drawn) set(cells.age, fmtAge(at - rows.get(id).created_at));
  }
  set(count, String(rows.size));
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
    changed.add(s.id);
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
      for (const id of rows.keys()) changed.add(id);
      rows.clear();
      for (const s of message.sessions) { rows.set(s.id, s); changed.add(s.id); }
    } else {
      for (const s of message.upsert) { rows.set(s.id, s); changed.add(s.id); }
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
