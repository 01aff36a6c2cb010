// The dashboard: an Overview every second over server-sent events (/events), executions and
// DLQ reasons from the JSON API. No framework, no build step.

const COLORS = ["#1565c0", "#2e7d32", "#ef6c00", "#6a1b9a", "#00838f", "#ad1457", "#5d4037", "#455a64"];
const HISTORY = 300; // points kept for the share chart (one per second: five minutes)
const history = []; // [{at, shares: {tenant: served share}, weights: {tenant: weight share}}]
const colorOf = {};

const $ = (selector) => document.querySelector(selector);
const esc = (value) =>
  String(value ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const pct = (value) => `${Math.round((value || 0) * 100)}%`;
const ms = (value) => (value === null || value === undefined ? "-" : Math.round(value));

function color(tenant) {
  if (!(tenant in colorOf)) colorOf[tenant] = COLORS[Object.keys(colorOf).length % COLORS.length];
  return colorOf[tenant];
}

function renderTenants(overview) {
  const rows = overview.tenants.map((t) => {
    const weight = t.factor !== 1 ? `${t.weight} ×${t.factor}` : `${t.weight}`;
    const until = t.until ? ` until ${esc(t.until.slice(11, 19))}` : "";
    return `<tr data-tenant="${esc(t.tenant)}">
      <td><span style="color:${color(t.tenant)}">■</span> ${esc(t.tenant)}</td>
      <td class="num" data-field="weight">${esc(weight)}</td>
      <td class="num" data-field="weight_share">${pct(t.weight_share)}</td>
      <td class="num" data-field="served_share">${pct(t.served_share)}</td>
      <td class="num" data-field="dwell_p50_ms">${ms(t.dwell_p50_ms)}</td>
      <td class="num" data-field="dwell_p99_ms">${ms(t.dwell_p99_ms)}</td>
      <td class="num" data-field="in_flight">${t.in_flight}</td>
      <td class="num" data-field="backlog">${t.backlog}</td>
      <td class="state-${esc(t.state)}" data-field="state">${esc(t.state)}${until}</td>
    </tr>`;
  });
  $("#tenants tbody").innerHTML = rows.join("");
}

function renderChart() {
  const svg = $("#share-chart");
  const width = 800, height = 200;
  if (!history.length) return;
  const tenants = [...new Set(history.flatMap((h) => Object.keys(h.shares)))];
  const x = (i) => (i / Math.max(1, HISTORY - 1)) * width;
  const y = (share) => height - share * height;
  const offset = HISTORY - history.length;
  let paths = "";
  for (const tenant of tenants) {
    const served = history.map((h, i) => `${x(i + offset)},${y(h.shares[tenant] || 0)}`).join(" ");
    const weight = history.map((h, i) => `${x(i + offset)},${y(h.weights[tenant] || 0)}`).join(" ");
    paths += `<polyline fill="none" stroke="${color(tenant)}" stroke-width="2" points="${served}"/>`;
    paths += `<polyline fill="none" stroke="${color(tenant)}" stroke-width="1" stroke-dasharray="4 4" points="${weight}"/>`;
  }
  svg.innerHTML = paths;
  $("#share-legend").innerHTML =
    tenants.map((t) => `<span style="color:${color(t)}">■ ${esc(t)}</span>`).join("") +
    "<span>solid: served share, dashed: weight share (last 5 min)</span>";
}

function renderWorkers(overview) {
  $("#workers tbody").innerHTML = overview.workers
    .map(
      (w) => `<tr data-worker="${esc(w.id)}"><td>${esc(w.id)}</td><td>${esc(w.pool)}</td>
        <td class="num" data-field="load">${w.in_flight}/${w.concurrency}</td><td>${esc((w.steps || []).join(", "))}</td></tr>`,
    )
    .join("");
}

function renderViolations(overview) {
  const items = overview.violations;
  $("#violations tbody").innerHTML = items
    .slice(0, 30)
    .map(
      (v) => `<tr data-violation="${esc(v.command_id)}"><td>${esc(String(v.window_start || "").slice(11, 19))}</td>
        <td>${esc(v.tenant)}</td><td>${esc(v.rule)}</td><td class="state-${v.action === "quarantine" ? "quarantined" : "penalised"}">${esc(v.action)}</td>
        <td>${esc(v.measured)} / ${esc(v.limit)}</td><td>${esc(v.reason)}</td></tr>`,
    )
    .join("");
  const times = items.map((v) => Date.parse(v.window_start)).filter((t) => !Number.isNaN(t));
  const end = Date.now(), start = end - 30 * 60 * 1000;
  $("#violations-timeline").innerHTML = items
    .map((v) => {
      const t = Date.parse(v.window_start);
      if (Number.isNaN(t) || t < start) return "";
      const cx = ((t - start) / (end - start)) * 800;
      const fill = v.action === "quarantine" ? "#c62828" : v.action === "penalty" ? "#ef6c00" : "#999";
      return `<circle cx="${cx}" cy="30" r="6" fill="${fill}"><title>${esc(v.tenant)} ${esc(v.rule)} ${esc(v.action)}</title></circle>`;
    })
    .join("") + `<text x="4" y="56" font-size="10" fill="#777">last 30 min${times.length ? "" : ": none"}</text>`;
}

let dlqReasons = {};
function renderDlqs(overview) {
  const rows = Object.entries(overview.dlqs).map(([name, depth]) => {
    const reasons = dlqReasons[name] ? Object.entries(dlqReasons[name]).map(([r, n]) => `${esc(r)} ${n}`).join(", ") : "";
    const button = depth ? `<button class="replay" data-queue="${esc(name)}">replay…</button>` : "";
    return `<tr data-queue="${esc(name)}"><td>${esc(name)}</td><td class="num" data-field="depth">${depth}</td>
      <td data-field="reasons">${reasons}</td><td>${button}</td></tr>`;
  });
  $("#dlqs tbody").innerHTML = rows.join("");
}

async function refreshDlqReasons() {
  try {
    const answer = await (await fetch("api/dlqs")).json();
    dlqReasons = Object.fromEntries(answer.queues.map((q) => [q.queue, q.reasons]));
  } catch (error) {
    console.warn("dlq reasons", error);
  }
}

function renderOverview(overview) {
  const rates = Object.entries(overview.executions_per_s).map(([s, r]) => `${s} ${r.toFixed(1)}/s`).join(", ");
  const dlqTotal = Object.values(overview.dlqs).reduce((a, b) => a + b, 0);
  $("#summary").textContent = `${overview.tenants.length} tenants, ${overview.workers.length} workers, ` +
    `${dlqTotal} dead letters, ${overview.dispatcher ? "dispatcher leading" : "no dispatcher leads"} · ${overview.at.slice(11, 19)} UTC`;
  $("#rates").textContent = rates ? `(${rates})` : "(none in the last 10 s)";
  history.push({
    at: overview.at,
    shares: Object.fromEntries(overview.tenants.map((t) => [t.tenant, t.served_share])),
    weights: Object.fromEntries(overview.tenants.map((t) => [t.tenant, t.weight_share])),
  });
  while (history.length > HISTORY) history.shift();
  renderTenants(overview);
  renderChart();
  renderWorkers(overview);
  renderViolations(overview);
  renderDlqs(overview);
  document.body.dataset.updated = overview.at;
}

// ---------------------------------------------------------------- executions
async function loadExecutions() {
  const form = new FormData($("#execution-filter"));
  const query = new URLSearchParams([...form.entries()].filter(([, v]) => v));
  const answer = await (await fetch(`api/executions?${query}`)).json();
  $("#executions tbody").innerHTML = answer.items
    .map((e) => {
      const duration = e.finished_at ? ((Date.parse(e.finished_at) - Date.parse(e.started_at)) / 1000).toFixed(2) : "";
      return `<tr class="clickable" data-execution="${esc(e.execution_id)}" data-tenant="${esc(e.tenant)}">
        <td>${esc(e.execution_id.slice(0, 8))}…</td><td>${esc(e.tenant)}</td><td>${esc(e.flow_id)}</td>
        <td class="state-${esc(e.status)}" data-field="status">${esc(e.status)}</td><td>${esc(e.started_at.slice(11, 19))}</td><td class="num">${duration}</td></tr>`;
    })
    .join("");
}

function layers(steps) {
  const depth = {};
  const visit = (id, seen = new Set()) => {
    if (id in depth) return depth[id];
    if (seen.has(id)) return 0;
    seen.add(id);
    const deps = steps[id]?.depends_on || [];
    depth[id] = deps.length ? 1 + Math.max(...deps.map((d) => visit(d, seen))) : 0;
    return depth[id];
  };
  Object.keys(steps).forEach((id) => visit(id));
  return depth;
}

const STEP_FILL = { succeeded: "#c8e6c9", failed: "#ffcdd2", running: "#fff3e0", dispatched: "#fff3e0",
  pending: "#eceff1", waiting: "#fff9c4", compensated: "#e1bee7", skipped: "#eeeeee" };

async function showExecution(id, tenant) {
  const view = await (await fetch(`api/executions/${encodeURIComponent(id)}?tenant=${encodeURIComponent(tenant || "")}`)).json();
  const detail = $("#execution-detail");
  detail.hidden = false;
  detail.dataset.execution = id;
  $("#execution-title").innerHTML = `${esc(view.tenant)}/${esc(view.flow_id)} · <span class="state-${esc(view.status)}" data-field="status">${esc(view.status)}</span> · ${esc(id)}`;
  const depth = layers(view.steps);
  const columns = {};
  Object.keys(view.steps).forEach((step) => (columns[depth[step]] = (columns[depth[step]] || []).concat(step)));
  const place = {};
  const nLayers = Math.max(1, Object.keys(columns).length);
  Object.entries(columns).forEach(([layer, ids]) =>
    ids.forEach((step, i) => (place[step] = { x: 20 + (Number(layer) * 760) / nLayers, y: 20 + (i * 200) / Math.max(1, ids.length) })),
  );
  let svg = "";
  for (const [step, info] of Object.entries(view.steps)) {
    for (const dep of info.depends_on || []) {
      if (place[dep]) svg += `<line x1="${place[dep].x + 120}" y1="${place[dep].y + 18}" x2="${place[step].x}" y2="${place[step].y + 18}" stroke="#90a4ae"/>`;
    }
  }
  for (const [step, info] of Object.entries(view.steps)) {
    const p = place[step];
    svg += `<g data-step="${esc(step)}"><rect x="${p.x}" y="${p.y}" width="120" height="36" rx="5" fill="${STEP_FILL[info.status] || "#eceff1"}" stroke="#607d8b"/>
      <text x="${p.x + 6}" y="${p.y + 15}" font-size="11">${esc(step)}</text><text x="${p.x + 6}" y="${p.y + 29}" font-size="10" fill="#555">${esc(info.status)}</text></g>`;
  }
  $("#dag").innerHTML = svg;
  $("#steps tbody").innerHTML = Object.entries(view.steps)
    .map(([step, s]) => {
      const duration = s.dispatched_at && s.finished_at ? ((Date.parse(s.finished_at) - Date.parse(s.dispatched_at)) / 1000).toFixed(3) : "";
      return `<tr data-step="${esc(step)}"><td>${esc(step)}</td><td>${esc(s.type)}</td><td>${esc((s.depends_on || []).join(", "))}</td>
        <td class="state-${esc(s.status)}" data-field="status">${esc(s.status)}</td><td class="num">${s.attempt}</td><td class="num">${duration}</td></tr>`;
    })
    .join("");
}

// ---------------------------------------------------------------- wiring
function connect() {
  const events = new EventSource("events");
  events.addEventListener("overview", (message) => {
    $("#live").dataset.live = "on";
    renderOverview(JSON.parse(message.data));
  });
  events.onerror = () => ($("#live").dataset.live = "off");
}

document.addEventListener("click", async (event) => {
  const row = event.target.closest("tr[data-execution]");
  if (row) return showExecution(row.dataset.execution, row.dataset.tenant);
  const button = event.target.closest("button.replay");
  if (button) {
    const queue = button.dataset.queue;
    if (!window.confirm(`Replay every message of ${queue} to where it came from?`)) return;
    const answer = await (await fetch(`api/dlqs/${encodeURIComponent(queue)}/replay`, {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ confirm: true }),
    })).json();
    $("#dlq-result").textContent = answer.error ? `replay failed: ${answer.error}` : `${queue}: ${answer.moved} replayed, ${answer.kept} kept`;
    refreshDlqReasons();
  }
});
$("#execution-filter").addEventListener("submit", (event) => {
  event.preventDefault();
  loadExecutions();
});

connect();
loadExecutions();
refreshDlqReasons();
setInterval(loadExecutions, 5000);
setInterval(refreshDlqReasons, 10000);
