// Keys: the admin creates keys (the secret is shown once, with a copy button),
// revokes and rotates them, and sets their limits and budget; spend is shown
// against the budget. An API key sees its own key, read only.
import { el, fmtCost, getJSON, post, csrf } from "./common.js";

const state = document.getElementById("keys-state");
const body = document.querySelector("#keys tbody");
const secretBox = document.getElementById("secret-box");
const LIMITS = ["rpm_limit", "tpm_limit", "max_concurrent_streams", "max_budget_usd", "budget_period"];
let admin = false;

async function call(method, url, data) {
  const response = await fetch(url, {
    method, credentials: "same-origin", headers: { "X-CSRF-Token": csrf(), "Content-Type": "application/json" },
    body: data === undefined ? undefined : JSON.stringify(data),
  });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(answer?.error?.message || `HTTP ${response.status}`);
  return answer;
}

function showSecret(key) {
  document.getElementById("secret").textContent = key.secret;
  document.getElementById("copied").textContent = "";
  secretBox.hidden = false;
  secretBox.scrollIntoView({ block: "nearest" });
}

document.getElementById("copy").addEventListener("click", async () => {
  const text = document.getElementById("secret").textContent;
  try { await navigator.clipboard.writeText(text); document.getElementById("copied").textContent = "Copied."; }
  catch { document.getElementById("copied").textContent = "Select the secret and copy it by hand."; }
});

function limitsText(k) {
  const parts = [];
  if (k.rpm_limit) parts.push(`${k.rpm_limit} req/min`);
  if (k.tpm_limit) parts.push(`${k.tpm_limit} tok/min`);
  if (k.max_concurrent_streams) parts.push(`${k.max_concurrent_streams} streams`);
  return parts.join(", ") || "none";
}

function budgetText(k) {
  if (!k.budget) return "none";
  const b = k.budget;
  return `${fmtCost(b.spent_usd)} of ${fmtCost(b.max_budget_usd)}${b.budget_period ? ` a ${b.budget_period}` : ""} (${fmtCost(b.remaining_usd)} left)`;
}

function row(k) {
  const actions = el("td", {});
  if (admin && !k.revoked) {
    actions.append(
      el("button", { type: "button", class: "secondary", "aria-label": `Limits of ${k.id}`, text: "Limits", onclick: () => editLimits(k) }), " ",
      el("button", { type: "button", class: "secondary", "aria-label": `Rotate ${k.id}`, text: "Rotate", onclick: async () => {
        if (!confirm(`Give ${k.id} a new secret? The old one stops working at once.`)) return;
        try { showSecret(await call("POST", `/console/api/keys/${encodeURIComponent(k.id)}/rotate`)); await load(); } catch (error) { state.textContent = error.message; }
      } }), " ",
      el("button", { type: "button", class: "danger", "aria-label": `Revoke ${k.id}`, text: "Revoke", onclick: async () => {
        if (!confirm(`Revoke ${k.id}? Requests with it are refused from now on.`)) return;
        try { await call("DELETE", `/console/api/keys/${encodeURIComponent(k.id)}`); await load(); } catch (error) { state.textContent = error.message; }
      } }));
  }
  const spent = k.spend?.cost_usd?.total;
  return el("tr", { "data-key": k.id },
    el("td", {}, el("code", { text: k.id }), el("br"), el("span", { class: "muted", text: `${k.name} · ${k.secret_prefix}…` })),
    el("td", { text: k.identity }), el("td", { text: k.team || "—" }), el("td", { text: limitsText(k) }),
    el("td", { class: "num", text: fmtCost(spent ?? 0) }), el("td", { text: budgetText(k) }),
    el("td", { class: k.revoked ? "state-failed" : "state-completed", text: k.revoked ? "revoked" : "active" }), actions);
}

const dialog = document.getElementById("limits-dialog");
const limitsForm = document.getElementById("limits-form");
let editing = null;

function editLimits(k) {
  editing = k;
  document.getElementById("limits-key").textContent = k.id;
  for (const name of LIMITS) limitsForm.elements[name].value = k[name] ?? "";
  dialog.showModal();
}

function limitsOf(form) {
  const out = {};
  for (const name of LIMITS) {
    const value = form.elements[name].value;
    out[name] = value === "" ? null : name === "budget_period" ? value : Number(value);
  }
  return out;
}

document.getElementById("limits-cancel").addEventListener("click", () => dialog.close());
limitsForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  try { await call("PATCH", `/console/api/keys/${encodeURIComponent(editing.id)}`, limitsOf(limitsForm)); dialog.close(); await load(); }
  catch (error) { state.textContent = error.message; dialog.close(); }
});

const create = document.getElementById("create-key");
if (create) {
  create.addEventListener("submit", async (event) => {
    event.preventDefault();
    const f = new FormData(create);
    const data = { identity: f.get("identity") };
    for (const name of ["name", "team"]) if (f.get(name)) data[name] = f.get(name);
    for (const [name, value] of Object.entries(limitsOf(create))) if (value !== null) data[name] = value;
    try { showSecret(await call("POST", "/console/api/keys", data)); create.reset(); await load(); }
    catch (error) { state.textContent = `Could not create the key: ${error.message}`; }
  });
}

async function load() {
  const data = await getJSON("/console/api/keys");
  if (!data) return;
  admin = data.admin;
  body.replaceChildren(...data.data.map(row));
  state.textContent = admin ? `${data.data.length} ${data.data.length === 1 ? "key" : "keys"}${data.has_more ? " (the first 100)" : ""}.` : data.data.length ? "Your key, with its limits and spend." : "You signed in without an API key.";
}

load().catch((error) => { state.textContent = error.message; });
