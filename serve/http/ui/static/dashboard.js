// The loop dashboard (served at /admin by serve/ui.py to an admin only).
//
// Owns: showing adapter versions, training runs with their per-step charts,
// feedback volume and thumbs rate per version and the canary split; the
// train / promote / roll back / canary buttons, each confirmed first.
// Invariants: data comes only from the public admin API (/admin/adapters,
// /admin/runs, /admin/runs/{id}, /admin/stats, /admin/models), authenticated
// by the HttpOnly session cookie the browser sends; text from the server is
// inserted with textContent, never as markup; without Chart.js the tables
// still work and the page says why the charts are missing.
"use strict";

const CHART_RUNS = 12; // runs whose per-step metrics are fetched and drawn
const ACTIVE = ["queued", "running"];
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];
const KINDS = ["thumbs", "rating", "correction", "pairwise", "reference"];
// TRL's names for the per-step numbers we chart (DPO; KTO logs the margin and loss too).
const METRICS = {loss: "loss", margin: "rewards/margins", accuracy: "rewards/accuracies"};

const $ = (sel) => document.querySelector(sel);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

const fmt = {
  num: (x, d = 3) => (typeof x === "number" && Number.isFinite(x) ? x.toFixed(d) : "—"),
  pct: (x) => (typeof x === "number" ? `${(x * 100).toFixed(0)}%` : "—"),
  time: (t) => {
    if (t === null || t === undefined || t === "") return "—";
    const d = typeof t === "number" ? new Date(t * 1000) : new Date(t);
    return Number.isNaN(d.getTime()) ? String(t) : d.toISOString().replace("T", " ").slice(0, 19);
  },
  version: (v) => v ?? "(none)",
};

function status(text, kind = "info") {
  const node = $("#status");
  node.hidden = !text;
  node.textContent = text || "";
  node.className = `banner ${kind}`;
}

async function api(method, path, body) {
  const resp = await fetch(path, {method, credentials: "same-origin",
    headers: body === undefined ? {} : {"Content-Type": "application/json"},
    body: body === undefined ? undefined : JSON.stringify(body)});
  let data = null;
  try { data = await resp.json(); } catch { /* not JSON: reported below by status */ }
  if (resp.status === 401) { // the session ended: the login form says so
    window.location.assign("/admin");
    throw new Error("The admin session ended; log in again.");
  }
  if (!resp.ok) throw new Error(data?.error?.message || `${method} ${path}: HTTP ${resp.status}`);
  return data;
}

// Each part loads on its own: one failing endpoint (say adapters while the
// engine boots) must not blank the rest of the page.
async function settle(promise) {
  try { return {value: await promise}; } catch (e) { return {error: e.message}; }
}

function fillTable(id, rows, emptyText) {
  const tbody = $(`#${id} tbody`);
  const cols = $(`#${id} thead tr`).children.length;
  tbody.replaceChildren(...(rows.length ? rows
    : [el("tr", {}, el("td", {colspan: String(cols), class: "empty", text: emptyText}))]));
}

const td = (text, cls) => el("td", {class: cls, text: text === undefined || text === null ? "—" : String(text)});
const badge = (s) => el("td", {}, el("span", {class: `badge ${s}`, text: s}));

// ------------------------------------------------------------------ charts

const charts = {};

function drawChart(id, config, points) {
  const canvas = $(`#${id}`);
  charts[id]?.destroy();
  delete charts[id];
  canvas.dataset.points = String(points);
  const box = canvas.parentElement;
  box.querySelector(".no-data")?.remove();
  if (!window.Chart || !points) {
    box.append(el("p", {class: "no-data", text: window.Chart ? "No data yet." : "Chart unavailable (see above)."}));
  }
  if (!window.Chart) return;
  config.options = {animation: false, responsive: true, maintainAspectRatio: false,
    plugins: {legend: {position: "bottom", labels: {boxWidth: 12}}}, ...config.options};
  charts[id] = new window.Chart(canvas, config);
}

function stepChart(id, details, key, yTitle) {
  let points = 0;
  const datasets = details.map((run, i) => {
    const data = (run.metrics || []).filter((m) => typeof m[key] === "number").map((m) => ({x: m.step, y: m[key]}));
    points += data.length;
    return {label: run.version || run.id, data, borderColor: COLORS[i % COLORS.length],
      backgroundColor: COLORS[i % COLORS.length], pointRadius: 2, tension: 0.2};
  }).filter((d) => d.data.length);
  drawChart(id, {type: "line", data: {datasets}, options: {scales: {
    x: {type: "linear", title: {display: true, text: "step"}}, y: {title: {display: true, text: yTitle}}}}}, points);
}

function versionChart(details) {
  const done = details.filter((r) => (r.metrics || []).length || r.gate).slice().reverse(); // oldest first
  const last = (r, key) => {
    const ms = (r.metrics || []).filter((m) => typeof m[key] === "number");
    return ms.length ? ms[ms.length - 1][key] : null;
  };
  const series = [
    ["loss (last step)", (r) => last(r, METRICS.loss)],
    ["reward margin (last step)", (r) => last(r, METRICS.margin)],
    ["preference accuracy (last step)", (r) => last(r, METRICS.accuracy)],
    ["gate: preference accuracy", (r) => r.gate?.preference?.candidate?.accuracy ?? null],
  ];
  let points = 0;
  const datasets = series.map(([label, get], i) => {
    const data = done.map(get);
    points += data.filter((v) => v !== null).length;
    return {label, data, backgroundColor: COLORS[i]};
  });
  drawChart("chart-versions", {type: "bar", data: {labels: done.map((r) => r.version || r.id), datasets}}, points);
}

function feedbackChart(stats) {
  const versions = [...new Set(stats.feedback.map((r) => fmt.version(r.version)))];
  const datasets = KINDS.map((kind, i) => ({label: kind, backgroundColor: COLORS[i],
    data: versions.map((v) => stats.feedback.find((r) => fmt.version(r.version) === v && r.type === kind)?.count || 0)}));
  const points = stats.feedback.reduce((n, r) => n + r.count, 0);
  drawChart("chart-feedback", {type: "bar", data: {labels: versions, datasets},
    options: {scales: {x: {stacked: true}, y: {stacked: true, beginAtZero: true, ticks: {precision: 0}}}}}, points);
}

// ------------------------------------------------------------------ sections

function renderServing(models, stats) {
  const alias = models?.data.find((m) => !m.parent);
  $("#live-version").textContent = alias ? alias.version : "—";
  $("#canary").textContent = alias?.canary
    ? `${alias.canary.version} takes ${fmt.pct(alias.canary.share)} of ${alias.id}` : "off";
  const versions = stats?.alias_traffic.versions || [];
  fillTable("traffic-table", versions.map((r) => el("tr", {}, td(fmt.version(r.version)), td(r.count), td(fmt.pct(r.share)))),
    "No requests to the alias in the last hour.");
}

function renderVersions(adapters, runs) {
  const byVersion = new Map(runs.filter((r) => r.version).map((r) => [r.version, r]));
  fillTable("versions-table", adapters.slice().reverse().map((m) => {
    const run = byVersion.get(m.version);
    const pref = run?.gate?.preference, tools = run?.gate?.tool_validity;
    const data = [m.dataset_ids?.length ? `${m.dataset_ids.length} feedback items` : null,
      run?.dataset ? `train ${run.dataset.train} / eval ${run.dataset.eval}` : null].filter(Boolean).join("; ");
    return el("tr", {dataset: {version: m.version}},
      td(m.version), badge(m.status), td(m.parent), td(m.method), td(data || "—"),
      td(pref ? `${fmt.num(pref.candidate?.accuracy, 2)} vs live ${fmt.num(pref.live?.accuracy, 2)} (n=${pref.candidate?.n ?? "?"})` : "—"),
      td(tools ? `${fmt.num(tools.candidate?.validity, 2)} vs live ${fmt.num(tools.live?.validity, 2)}` : "—"),
      td(m.reason || "", m.status === "rejected" ? "reason rejected" : "reason"), td(fmt.time(m.created_at)));
  }), "No adapter versions yet.");
}

function renderRuns(runs, details) {
  const steps = new Map(details.map((d) => [d.id, (d.metrics || []).length]));
  fillTable("runs-table", runs.map((r) => el("tr", {dataset: {run: r.id}},
    td(r.id), badge(r.status), td(r.trigger), td(r.method), td(r.version), td(r.parent),
    td(r.dataset ? `${r.dataset.train} / ${r.dataset.eval} / ${r.dataset.gate_pairs ?? "—"}` : "—"),
    // Rows made from grades (reference feedback) and how many answers were graded for them.
    td(r.dataset?.graded_candidates !== undefined ? `${r.dataset.graded_rows} / ${r.dataset.graded_candidates}` +
      (r.dataset.sampling?.answers ? ` (${r.dataset.sampling.answers} sampled)` : "") : "—", "graded"),
    td(steps.has(r.id) ? steps.get(r.id) : "…"), td(r.reason || "", r.status === "rejected" ? "reason rejected" : "reason"),
    td(fmt.time(r.created_at)))), "No training runs yet.");
  stepChart("chart-loss", details, METRICS.loss, "loss");
  stepChart("chart-margin", details, METRICS.margin, "reward margin");
  stepChart("chart-accuracy", details, METRICS.accuracy, "accuracy");
  versionChart(details);
}

function renderFeedback(stats) {
  const versions = [...new Set([...stats.traffic, ...stats.thumbs, ...stats.feedback].map((r) => r.version))];
  fillTable("thumbs-table", versions.map((v) => {
    const t = stats.thumbs.find((r) => r.version === v);
    const requests = stats.traffic.find((r) => r.version === v)?.count ?? 0;
    const items = stats.feedback.filter((r) => r.version === v).reduce((n, r) => n + r.count, 0);
    return el("tr", {dataset: {version: fmt.version(v)}}, td(fmt.version(v)), td(requests), td(t?.up ?? 0),
      td(t?.down ?? 0), td(fmt.pct(t?.rate)), td(items));
  }), "No traffic or feedback yet.");
  feedbackChart(stats);
}

function renderGrades(stats) {
  fillTable("grades-table", (stats.grades || []).map((r) => el("tr", {dataset: {version: fmt.version(r.version), grader: r.grader}},
    td(fmt.version(r.version)), td(r.grader), td(r.n), td(r.failed), td(fmt.num(r.mean_score, 2)))),
    "No grades yet: reference feedback, tool results and POST /admin/grade make them.");
}

function fillVersionSelects(adapters, models) {
  const live = models?.data.find((m) => !m.parent)?.version;
  for (const select of document.querySelectorAll(".version-select")) {
    const keep = select.value;
    select.replaceChildren(...adapters.slice().reverse().map((m) => el("option", {value: m.version,
      text: `${m.version} (${m.version === live ? "live" : m.status})`})));
    if (adapters.some((m) => m.version === keep)) select.value = keep;
  }
}

// ------------------------------------------------------------------ loading

let timer = null;

async function refresh() {
  clearTimeout(timer);
  const [models, adapters, runs, stats] = await Promise.all([
    settle(api("GET", "/admin/models")), settle(api("GET", "/admin/adapters")),
    settle(api("GET", "/admin/runs?limit=50")), settle(api("GET", "/admin/stats"))]);
  const errors = [models, adapters, runs, stats].filter((r) => r.error).map((r) => r.error);
  const runList = runs.value?.data || [];
  const details = (await Promise.all(runList.slice(0, CHART_RUNS)
    .map((r) => settle(api("GET", `/admin/runs/${encodeURIComponent(r.id)}`))))).filter((r) => r.value).map((r) => r.value);
  renderServing(models.value, stats.value);
  if (adapters.value) {
    renderVersions(adapters.value.data, runList);
    fillVersionSelects(adapters.value.data, models.value);
  }
  if (runs.value) renderRuns(runList, details);
  if (stats.value) { renderFeedback(stats.value); renderGrades(stats.value); }
  if (errors.length) status(`Some data could not be loaded: ${[...new Set(errors)].join("; ")}`, "error");
  document.body.dataset.loaded = "1";
  // While a training runs, follow it.
  if (runList.some((r) => ACTIVE.includes(r.status))) timer = setTimeout(refresh, 5000);
}

// ------------------------------------------------------------------ actions

async function act(question, method, path, body, describe) {
  if (!window.confirm(question)) { status("Cancelled: nothing was changed."); return; }
  status("Working…");
  try {
    const out = await api(method, path, body);
    status(describe(out), "ok");
  } catch (e) {
    status(`Refused: ${e.message}`, "error");
  }
  await refresh();
}

$("#train-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const method = $("#train-method").value || undefined;
  const promote = $("#train-promote").checked;
  act(`Start a training run now (${method || "default method"}; ${promote ? "promote it if the gate passes" : "do not promote"})?`,
    "POST", "/admin/train", {promote, ...(method ? {method} : {})},
    (out) => `Training run ${out.id} is ${out.status}.`);
});

$("#promote-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const v = $("#promote-version").value;
  act(`Promote ${v} to live? Every new request to ${$("#alias-name").dataset.alias} will use it.`,
    "POST", "/admin/promote", {version: v}, (out) => `${out.version} is live (was ${out.previous}).`);
});

$("#rollback-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const v = $("#rollback-version").value;
  act(`Roll back to ${v}? It becomes live at once.`, "POST", "/admin/rollback", {version: v},
    (out) => `Rolled back: ${out.version} is live (was ${out.previous}).`);
});

$("#canary-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const v = $("#canary-version").value;
  const share = Number($("#canary-share").value) / 100;
  if (!(share >= 0 && share <= 1)) { status("The canary share must be between 0 and 100%.", "error"); return; }
  act(`Send ${fmt.pct(share)} of ${$("#alias-name").dataset.alias} traffic to ${v}?`, "POST", "/admin/canary",
    {version: v, share}, (out) => (out.version ? `Canary: ${out.version} takes ${fmt.pct(out.share)}.` : "Canary is off."));
});

$("#canary-off").addEventListener("click", () => {
  act("Turn the canary off? All alias traffic goes to the live version.", "POST", "/admin/canary", {share: 0},
    () => "Canary is off.");
});

$("#refresh").addEventListener("click", () => refresh());

if (!window.Chart && !$("#charts-missing")) { // installed but failed to load
  $("main").prepend(el("p", {id: "charts-missing", class: "banner error",
    text: "Charts are unavailable: the charting library did not load. Tables below still work."}));
}
refresh();
