// Models and plugins: providers with their models and circuit, readiness
// checks with their reasons, and each plugin with its version, hooks and errors.
import { el, fmtMs, getJSON } from "./common.js";

function cell(text, cls) { return el("td", { class: cls, text: String(text ?? "—") }); }

async function main() {
  const state = document.getElementById("models-state");
  const data = await getJSON("/console/api/models");
  if (!data) return;
  const circuits = data.circuits || {};
  document.querySelector("#providers tbody").replaceChildren(...data.providers.map((p) => {
    const circuit = circuits[p.name];
    const text = circuit ? `${circuit.state}${circuit.retry_in_seconds ? ` (retry in ${circuit.retry_in_seconds} s)` : ""}` : "—";
    return el("tr", {}, cell(p.name), cell(p.models.join(", ") || "none"), cell(text, circuit ? `state-${circuit.state === "closed" ? "completed" : "failed"}` : ""));
  }));
  const health = data.health || [];
  document.querySelector("#health tbody").replaceChildren(...health.map((h) =>
    el("tr", {}, cell(h.check), cell(h.ok ? "ready" : "not ready", h.ok ? "state-completed" : "state-failed"), cell(fmtMs(h.ms), "num"),
      cell(typeof h.detail === "string" ? h.detail : JSON.stringify(h.detail)))));
  const plugins = data.plugins || [];
  document.querySelector("#plugins tbody").replaceChildren(...plugins.map((p) => {
    const faults = Object.values(p.faults || {}).reduce((a, b) => a + (typeof b === "number" ? b : 0), 0);
    const errors = (p.listener?.errors || 0) + faults;
    return el("tr", {}, cell(p.name), cell(p.version), cell(p.origin), cell(p.contract), cell(errors, "num"), cell((p.hooks || []).join(", ")));
  }));
  document.getElementById("health").closest("section").hidden = !data.health;
  document.getElementById("plugins").closest("section").hidden = !data.plugins;
  state.textContent = data.health ? `${health.filter((h) => h.ok).length} of ${health.length} checks ready` : "Readiness and plugins are shown to the admin.";
}

main().catch((error) => { document.getElementById("models-state").textContent = error.message; });
