// The board page: a client of the JSON API under /api and nothing else. The Train form is generated from the config's
// JSON schema (GET /api/schema); charts are uPlot (vendored). Text from files and children is always set as text,
// never as HTML.
"use strict";

const state = {lang: localStorage.getItem("lmforge-lang") || "en", token: localStorage.getItem("lmforge-token") || "",
  info: null, schema: null, runs: [], run: null, records: new Map(), source: null, charts: {}, serve: null};
const $ = (id) => document.getElementById(id);

// --- text, elements, API -------------------------------------------------------------------------------------
function t(key, vars) {
  let text = (I18N[state.lang] || {})[key] ?? I18N.en[key] ?? key;
  for (const [k, v] of Object.entries(vars || {})) text = text.replaceAll(`{${k}}`, v);
  return text;
}
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") el.className = v; else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) el.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children.flat()) if (child !== null && child !== undefined)
    el.append(child instanceof Node ? child : String(child));
  return el;
}
function applyLanguage() {
  document.documentElement.lang = state.lang === "zh" ? "zh-CN" : "en";
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of document.querySelectorAll("[data-i18n-placeholder]")) el.placeholder = t(el.dataset.i18nPlaceholder);
  $("lang").textContent = state.lang === "zh" ? "English" : "中文";
  renderRuns();
  if (state.run) renderRunStatus(state.runStatus);
}
function banner(text) { $("banner").textContent = text || ""; $("banner").hidden = !text; }
function withToken(url) { return state.token ? `${url}${url.includes("?") ? "&" : "?"}token=${encodeURIComponent(state.token)}` : url; }
function fileUrl(path) { return withToken(`/api/files/raw?path=${encodeURIComponent(path)}`); }

async function api(method, path, body, raw) {
  const headers = {};
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  if (body !== undefined && !raw) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {method, headers, body: raw ? body : body === undefined ? undefined : JSON.stringify(body)});
  const text = await response.text();
  let data = text;
  try { data = JSON.parse(text); } catch (e) { /* plain text */ }
  if (response.status === 401) { $("tokenBox").hidden = false; banner(t("need_token")); }
  if (!response.ok) { const error = new Error((data && data.error) || response.statusText); error.status = response.status; error.data = data; throw error; }
  return data;
}
async function attempt(fn) { try { banner(""); return await fn(); } catch (error) { banner(error.message); return null; } }

// --- jobs ----------------------------------------------------------------------------------------------------
async function watchJob(id, onDone, onTick) {
  for (;;) {
    const job = await api("GET", `/api/jobs/${id}`);
    if (onTick) onTick(job);
    if (!["queued", "running", "stopping"].includes(job.state)) { onDone(job); return job; }
    await new Promise((r) => setTimeout(r, 600));
  }
}
function jobLine(job) {
  return h("span", {class: `job ${job.state}`}, `${job.kind} · ${t(job.state)}`,
    job.state === "failed" ? h("a", {href: fileUrl(job.log), target: "_blank"}, " log") : null);
}
async function refreshJobs() {
  const data = await api("GET", "/api/jobs").catch(() => null);
  if (!data) return;
  $("jobs").replaceChildren(...data.jobs.slice(-8).reverse().map((job) => h("li", {},
    h("code", {}, `lmforge ${job.args.slice(0, 3).join(" ")}`), " ", jobLine(job))));
}
function working(el, text) { el.replaceChildren(h("span", {class: "muted"}, text || t("working"))); }
// A report page (clean, compare) runs in a sandboxed frame with an origin of its own; with a token it is fetched with
// the header and never opened with the token in its address.
function reportView(path, id) {
  const frame = h("iframe", {class: "report", sandbox: "allow-scripts", title: path, id});
  api("GET", `/api/files/raw?path=${encodeURIComponent(path)}`).then((html) => { frame.srcdoc = html; })
    .catch((error) => { frame.srcdoc = error.message; });
  const link = state.info && state.info.auth ? h("code", {}, path)
    : h("a", {href: fileUrl(path), target: "_blank", rel: "noopener"}, t("open_report"));
  return [h("p", {}, link), frame];
}
function failure(el, job) { el.replaceChildren(h("div", {class: "errors job-failed"}, t("job_failed")), h("pre", {class: "log"}, job.log_tail || "")); }

// --- Data tab ------------------------------------------------------------------------------------------------
function fillFiles() {
  const files = state.info.datasets.map((f) => f.path);
  for (const select of [$("dataFile"), ...document.querySelectorAll(".fileSelect")]) {
    const keep = select.value;
    select.replaceChildren(...files.map((p) => h("option", {value: p}, p)));
    if (files.includes(keep)) select.value = keep;
  }
  $("filesList").replaceChildren(...files.map((p) => h("option", {value: p})));
}
async function refreshInfo() { state.info = await api("GET", "/api/info"); fillFiles(); }

async function uploadFile() {
  const file = $("uploadFile").files[0];
  if (!file) return;
  await attempt(async () => {
    const saved = await api("PUT", `/api/files/upload?name=${encodeURIComponent(file.name)}`, file, true);
    await refreshInfo();
    $("dataFile").value = saved.path;
  });
}
function renderInspect(report) {
  state.lastInspect = report;
  const out = [];
  for (const f of report.files) out.push(h("p", {}, h("b", {}, t("shape")), `: ${f.shape} (${f.file_format}) · ${f.path} · ${f.records} ${t("records")}`));
  out.push(h("p", {}, `${report.conversations} ${t("conversations")} · ${report.problems.length} ${t("problems")}`));
  if (!report.problems.length) out.push(h("p", {class: "ok"}, t("no_problems")));
  out.push(h("ul", {class: "errors"}, report.problems.slice(0, 50).map((p) => h("li", {}, `${p.where}: ${p.message}`))));
  const tk = report.tokens;
  if (tk && tk.length) out.push(h("h3", {}, `${t("tokens")} · ${tk.model}`), h("p", {},
    `p50 ${tk.length.p50} · p90 ${tk.length.p90} · p99 ${tk.length.p99} · max ${tk.length.max} · mean ${tk.length.mean} · ` +
    `cutoff_len ${tk.cutoff_len}: ${tk.fit}/${tk.conversations} fit, ${tk.truncated} truncated, ${tk.dropped} dropped · ` +
    `${tk.kept_supervised_tokens.toLocaleString()} / ${tk.kept_tokens.toLocaleString()} trained`));
  report.samples.forEach((sample, i) => out.push(h("h3", {}, `${t("sample")} ${i + 1} · ${sample.where}`),
    h("pre", {class: "sample"}, sample.segments.map((s) => s.trained ? h("mark", {class: "trained"}, s.text) : h("span", {}, s.text)))));
  if (report.samples.length) out.push(h("p", {class: "help"}, t("trained_legend")));
  $("inspectOut").replaceChildren(...out);
}
async function inspect() {
  const path = $("dataFile").value;
  working($("inspectOut"));
  await attempt(async () => {
    const model = $("cfg-model-name_or_path") && $("cfg-model-name_or_path").value.trim();
    const job = await api("POST", "/api/data/inspect", {path, cutoff_len: Number($("inspectCutoff").value),
      train_on: $("inspectTrainOn").value, samples: 3, model: model || null});
    await watchJob(job.id, (done) => {
      try { renderInspect(JSON.parse(done.output)); } catch (e) { failure($("inspectOut"), done); }
    });
  });
}
async function clean() {
  working($("cleanOut"));
  await attempt(async () => {
    const job = await api("POST", "/api/data/clean", {path: $("dataFile").value, recipe: $("recipe").value});
    await watchJob(job.id, async (done) => {
      if (done.state !== "done") return failure($("cleanOut"), done);
      await refreshInfo();
      $("cleanOut").replaceChildren(`${t("wrote")} ${done.meta.output}`,
        h("pre", {}, (done.log_tail || "").trim().split("\n").slice(-3).join("\n")),
        ...reportView(done.meta.report_html, "cleanReport"));
    });
  });
}
async function split() {
  working($("splitOut"));
  await attempt(async () => {
    const job = await api("POST", "/api/data/split", {path: $("dataFile").value, val: $("splitVal").value,
      test: $("splitTest").value, seed: Number($("splitSeed").value)});
    await watchJob(job.id, async (done) => {
      if (done.state !== "done") return failure($("splitOut"), done);
      await refreshInfo();
      $("splitOut").replaceChildren(h("pre", {}, (done.log_tail || "").trim()));
    });
  });
}

// --- Train tab (the form itself is form.js) ----------------------------------------------------------------
let checkTimer = null;
function scheduleCheck() { clearTimeout(checkTimer); checkTimer = setTimeout(checkConfig, 250); }
async function checkConfig() {
  const config = formConfig();
  for (const el of document.querySelectorAll(".field .err")) el.textContent = "";
  for (const el of document.querySelectorAll(".field.invalid")) el.classList.remove("invalid");
  $("configErrors").replaceChildren();
  try {
    const preview = await api("POST", "/api/config/preview", {config});
    $("yaml").textContent = preview.yaml;
    state.yaml = preview.yaml;
    $("startBtn").disabled = false;
    $("configErrors").replaceChildren(h("span", {class: "ok"}, t("valid")));
    estimate(config);
  } catch (error) {
    $("startBtn").disabled = true;
    const errors = (error.data && error.data.errors) || [{path: "config", message: error.message}];
    const loose = [];
    for (const e of errors) {
      const box = document.getElementById(`err-${e.path}`);
      if (box) { box.textContent = e.message; box.parentElement.classList.add("invalid"); box.closest("details").open = true; }
      else loose.push(h("li", {}, `${e.path}: ${e.message}`));
    }
    $("configErrors").replaceChildren(h("ul", {}, loose), h("span", {}, `${errors.length} ✗`));
  }
}
function duration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}
async function estimate(config) {
  const tokens = state.lastInspect && state.lastInspect.tokens && state.lastInspect.tokens.length && state.lastInspect.tokens.length.mean;
  const result = await api("POST", "/api/estimate", {config, tokens_per_example: tokens}).catch((e) => ({error: e.message}));
  if (result.error) { $("estimate").textContent = result.error; return; }
  const m = result.memory_mib;
  $("estimate").replaceChildren(
    h("p", {}, h("b", {}, `${t("memory")}: ~${m.peak.toLocaleString()} MiB`),
      ` (weights ${m.weights} + optimizer ${m.optimizer} + activations ${m.activations} + runtime ${m.runtime})`),
    h("p", {}, h("b", {}, `${t("time")}: ${result.seconds ? "~" + duration(result.seconds) : t("steps_unknown")}`),
      ` · ${result.seconds_per_step} s ${t("per_step")} · ${result.tokens_per_s} tokens/s`),
    h("p", {class: "help"}, `${result.trainable_parameters.toLocaleString()} / ${result.parameters.toLocaleString()} ${t("trainable")} · `,
      result.speed_source === "measured" ? `${t("speed_measured")} ${result.measured_by}` : t("speed_model")));
}
function downloadYaml() {
  const link = h("a", {href: URL.createObjectURL(new Blob([state.yaml || ""], {type: "application/x-yaml"})),
    download: `${$("cfg-name").value || "config"}.yaml`});
  document.body.append(link); link.click(); link.remove();
}
async function startRun() {
  await attempt(async () => {
    const started = await api("POST", "/api/runs", {config: formConfig()});
    await refreshRuns();
    showTab("runs");
    selectRun(started.run);
  });
}

// --- Runs tab ------------------------------------------------------------------------------------------------
async function refreshRuns() {
  const data = await api("GET", "/api/runs").catch(() => null);
  if (!data) return;
  state.runs = data.runs;
  renderRuns();
  const names = state.runs.map((r) => r.name);
  for (const select of document.querySelectorAll(".runSelect")) {
    const keep = select.value;
    select.replaceChildren(...names.map((n) => h("option", {value: n}, n)));
    if (names.includes(keep)) select.value = keep;
  }
}
function renderRuns() {
  const body = document.querySelector("#runsTable tbody");
  if (!body) return;
  body.replaceChildren(...state.runs.map((r) => h("tr", {class: r.name === state.run ? "selected" : "", "data-run": r.name,
    onclick: () => selectRun(r.name)}, h("td", {}, r.name), h("td", {class: `status ${r.status}`}, t(r.status)),
    h("td", {}, `${r.step}${r.total_steps ? " / " + r.total_steps : ""}`), h("td", {}, r.loss ?? "—"),
    h("td", {}, `${r.stage || ""} · ${r.method || ""}`), h("td", {}, r.model || ""))));
}
const SERIES = {
  chartLoss: [["loss", "#2b6cb0"], ["eval_loss", "#c05621"]], chartGrad: [["grad_norm", "#2f855a"]],
  chartLr: [["learning_rate", "#6b46c1"]], chartSpeed: [["tokens_per_s", "#b7791f"]],
};
const STEP_INCREMENTS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000];
function tickLabels(u, splits) {  // 2e-4, not 0: learning rates are small
  return splits.map((v) => v === null ? "" : v !== 0 && Math.abs(v) < 0.01 ? v.toExponential(1) : String(+v.toPrecision(4)));
}
function makeCharts() {
  for (const chart of Object.values(state.charts)) chart.destroy();
  state.charts = {};
  for (const [id, series] of Object.entries(SERIES)) {
    const el = $(id);
    el.replaceChildren();
    el.dataset.points = "0";
    state.charts[id] = new uPlot({width: Math.max(260, el.clientWidth || 420), height: 180, scales: {x: {time: false}},
      series: [{label: "step"}, ...series.map(([label, stroke]) => ({label, stroke, width: 2, spanGaps: true,
        points: {show: label === "eval_loss" ? true : undefined}}))],
      legend: {live: false}, axes: [{label: "step", incrs: STEP_INCREMENTS}, {size: 64, values: tickLabels}]},
      [[], ...series.map(() => [])], el);
  }
}
function drawCharts() {
  const records = [...state.records.values()].sort((a, b) => a.step - b.step);
  const steps = records.map((r) => r.step);
  for (const [id, series] of Object.entries(SERIES)) {
    const columns = series.map(([key]) => records.map((r) => (typeof r[key] === "number" ? r[key] : null)));
    state.charts[id].setData([steps, ...columns]);
    $(id).dataset.points = String(columns[0].filter((v) => v !== null).length);
  }
}
function selectRun(name) {
  if (state.source) state.source.close();
  state.run = name; state.records = new Map(); state.runStatus = null;
  $("runPanel").hidden = false;
  $("runName").textContent = name;
  $("runYaml").href = withToken(`/api/runs/${encodeURIComponent(name)}/config.yaml`);
  renderRuns();
  makeCharts();
  const source = new EventSource(withToken(`/api/runs/${encodeURIComponent(name)}/stream`));
  state.source = source;
  source.addEventListener("metrics", (event) => {
    for (const record of JSON.parse(event.data)) if (typeof record.step === "number")
      state.records.set(record.step, {...(state.records.get(record.step) || {}), ...record});
    drawCharts();
  });
  source.addEventListener("status", (event) => { renderRunStatus(JSON.parse(event.data)); refreshDetail(); });
  refreshDetail();
}
function renderRunStatus(status) {
  if (!status) return;
  state.runStatus = status;
  $("runStatus").textContent = t(status.status);
  $("runStatus").className = `status ${status.status}`;
  $("runStatus").dataset.status = status.status;
  $("runProgress").textContent = `${t("step")} ${status.step}${status.total_steps ? " / " + status.total_steps : ""}`;
  $("runEta").textContent = status.eta_seconds !== null && status.eta_seconds !== undefined ? ` · ${t("eta")} ${duration(status.eta_seconds)}` : "";
  const active = ["running", "queued", "stopping"].includes(status.status);
  $("stopBtn").disabled = !["running", "queued"].includes(status.status);
  $("resumeBtn").disabled = active || !status.checkpoints.length || status.status === "finished";
  const row = state.runs.find((r) => r.name === status.name);
  if (row) { Object.assign(row, status); renderRuns(); }
}
async function refreshDetail() {
  if (!state.run) return;
  const name = state.run;
  const detail = await api("GET", `/api/runs/${encodeURIComponent(name)}`).catch(() => null);
  if (!detail || name !== state.run) return;
  renderRunStatus(detail);
  $("hints").replaceChildren(...detail.hints.map((hint) => h("li", {class: `hint ${hint.id}`}, t(`hint_${hint.id}`,
    {step: hint.step ?? hint.best_step, loss: hint.loss, lowest: hint.lowest, best: hint.best_eval_loss, last: hint.last_eval_loss}))));
  const log = await api("GET", `/api/runs/${encodeURIComponent(name)}/log`).catch(() => "");
  const el = $("runLog");
  el.textContent = String(log).split("\n").filter((l) => l.trim()).slice(-40).join("\n");
  el.scrollTop = el.scrollHeight;
}
async function stopRun() { await attempt(() => api("POST", `/api/runs/${encodeURIComponent(state.run)}/stop`)); refreshDetail(); }
async function resumeRun() {
  await attempt(async () => { await api("POST", `/api/runs/${encodeURIComponent(state.run)}/resume`); });
  refreshDetail();
}

// --- Evaluate & compare ----------------------------------------------------------------------------------------
function figure(v) {  // 1.7e-6 stays 1.7e-6 (an export check), 34.41563 becomes 34.4156
  return v !== 0 && Math.abs(v) < 0.001 ? v.toExponential(1) : String(+v.toFixed(4));
}
function metricsTable(rows, columns) {
  return h("table", {class: "metrics"}, h("thead", {}, h("tr", {}, h("th", {}, ""), columns.map((c) => h("th", {}, c)))),
    h("tbody", {}, rows.map(([label, values]) => h("tr", {}, h("th", {}, label),
      columns.map((c) => h("td", {}, typeof values[c] === "number" ? figure(values[c]) : values[c] ?? "—"))))));
}
async function evaluateRun() {
  const name = $("evalRun").value, out = $("evalOut");
  working(out);
  await attempt(async () => {
    const job = await api("POST", `/api/runs/${encodeURIComponent(name)}/eval`, {data: $("evalData").value,
      max_samples: Number($("evalSamples").value), max_new_tokens: Number($("evalTokens").value), all_checkpoints: $("evalAll").checked});
    await watchJob(job.id, async (done) => {
      if (done.state !== "done") return failure(out, done);
      const detail = await api("GET", `/api/runs/${encodeURIComponent(name)}`);
      const parts = [];
      const metrics = detail.eval && (detail.eval.metrics || detail.eval);
      if (metrics) {
        const flat = Object.fromEntries(Object.entries(metrics).filter(([, v]) => typeof v === "number"));
        parts.push(h("h3", {}, t("metrics")), metricsTable([[name, flat]], Object.keys(flat)));
      }
      if (detail.sweep && detail.sweep.points) {
        const cols = Object.keys(detail.sweep.points[0]).filter((k) => typeof detail.sweep.points[0][k] === "number");
        parts.push(h("h3", {}, `${t("sweep")} · ${t("best")}: ${detail.best ? detail.best.label : "—"}`),
          metricsTable(detail.sweep.points.map((p) => [p.label || p.step, p]), cols));
        if (detail.sweep_plot) parts.push(h("img", {src: fileUrl(`runs/${name}/sweep.png`) + `&v=${Date.now()}`, class: "plot", alt: "sweep"}));
      }
      out.replaceChildren(...parts);
    });
  });
}
async function compareModels() {
  const out = $("compareOut");
  working(out);
  await attempt(async () => {
    const models = $("compareModels").value.split(",").map((s) => s.trim()).filter(Boolean);
    const job = await api("POST", "/api/compare", {models, data: $("evalData").value,
      max_samples: Number($("evalSamples").value), max_new_tokens: Number($("evalTokens").value)});
    await watchJob(job.id, (done) => {
      if (done.state !== "done") return failure(out, done);
      const models = (done.compare && done.compare.models) || [];
      const columns = models.length ? Object.keys(models[0].metrics).filter((k) => typeof models[0].metrics[k] === "number") : [];
      out.replaceChildren(metricsTable(models.map((m) => [m.label, m.metrics]), columns),
        ...reportView(done.meta.report_html, "compareReport"));
    });
  });
}
async function chatBoth() {
  const models = [$("chatA").value.trim(), $("chatB").value.trim()].filter(Boolean);
  $("chatLabelA").textContent = models[0] || "A"; $("chatLabelB").textContent = models[1] || "B";
  const outs = [$("chatOutA"), $("chatOutB")];
  outs.forEach((o) => { o.textContent = t("working"); o.dataset.done = ""; });
  await attempt(async () => {
    const started = await api("POST", "/api/chat", {prompt: $("chatPrompt").value, models, max_new_tokens: 48});
    await Promise.all(started.jobs.map((job, i) => watchJob(job.id, (done) => {
      outs[i].textContent = done.state === "done" ? done.output.trim() : `${t("job_failed")}\n${done.log_tail}`;
      outs[i].dataset.done = done.state;
    })));
  });
}

// --- Export & serve --------------------------------------------------------------------------------------------
async function exportRun() {
  const out = $("exportOut"), name = $("exportRun").value;
  working(out);
  await attempt(async () => {
    const job = await api("POST", `/api/runs/${encodeURIComponent(name)}/export`, {gguf: $("exportGguf").value || null,
      adapter_only: $("exportAdapter").checked});
    await watchJob(job.id, (done) => {
      if (done.state !== "done") return failure(out, done);
      const manifest = done.manifest || {};
      const entries = Object.entries(manifest.verification || {});
      const checks = entries.filter(([, v]) => v && typeof v === "object");  // logits compared: a table row each
      const facts = entries.filter(([, v]) => !v || typeof v !== "object").map(([k, v]) => `${k}: ${v}`);
      if (manifest.gguf) checks.push([manifest.gguf.file, manifest.gguf.read_back_vs_trained || {}]);
      if (manifest.modelfile) facts.push(`Modelfile: ${manifest.modelfile.written ? "✓" : "✗"}`);
      const columns = ["relative_rms", "top1_agreement", "tolerance"].filter((c) => checks.some(([, v]) => c in v));
      out.replaceChildren(h("p", {id: "exportDone"}, `${t("wrote")} ${done.meta.output} (${manifest.format || ""})`),
        h("h3", {}, t("checks")), metricsTable(checks, columns), h("p", {class: "help"}, facts.join(" · ")),
        manifest.modelfile && manifest.modelfile.written ? h("p", {}, h("code", {}, `ollama create ${name} -f ${done.meta.output}/Modelfile`)) : null,
        h("pre", {}, (done.log_tail || "").trim().split("\n").slice(-8).join("\n")));
    });
  });
}
function serveSnippets(meta) {
  const body = JSON.stringify({model: meta.model, messages: [{role: "user", content: "Hello"}]});
  const curl = `curl ${meta.base_url}/chat/completions \\\n  -H "Authorization: Bearer ${meta.key}" \\\n  -H "Content-Type: application/json" \\\n  -d '${body}'`;
  const python = `from openai import OpenAI\n\nclient = OpenAI(base_url="${meta.base_url}", api_key="${meta.key}")\n` +
    `reply = client.chat.completions.create(model="${meta.model}", messages=[{"role": "user", "content": "Hello"}])\n` +
    `print(reply.choices[0].message.content)`;
  return [h("h3", {}, t("curl")), h("pre", {id: "curlSnippet"}, curl), h("h3", {}, t("python")), h("pre", {id: "pythonSnippet"}, python)];
}
async function startServe() {
  const name = $("serveRun").value;
  await attempt(async () => {
    const job = await api("POST", `/api/runs/${encodeURIComponent(name)}/serve`, {});
    state.serve = job.id;
    $("serveStop").hidden = false;
    $("serveOut").replaceChildren(...serveSnippets(job.meta));
    for (;;) {
      const view = await api("GET", `/api/jobs/${job.id}`);
      $("serveState").textContent = view.ready ? t("server_ready") : view.state === "running" ? t("server_starting") : t(view.state);
      $("serveState").dataset.state = view.ready ? "ready" : view.state;
      if (view.ready || !["running", "queued"].includes(view.state)) {
        if (!view.ready) failure($("serveOut"), view);
        break;
      }
      await new Promise((r) => setTimeout(r, 700));
    }
  });
}
async function stopServe() {
  if (!state.serve) return;
  await attempt(() => api("POST", `/api/jobs/${state.serve}/stop`));
  $("serveState").textContent = t("stopped");
  $("serveStop").hidden = true;
}

// --- tabs and start-up -----------------------------------------------------------------------------------------
function showTab(name) {
  for (const section of document.querySelectorAll(".tab")) section.hidden = section.id !== `tab-${name}`;
  for (const button of document.querySelectorAll("#tabs button")) button.classList.toggle("active", button.dataset.tab === name);
  location.hash = name;
  if (name === "runs") refreshRuns();
  if (name === "compare" || name === "export") suggestModels();
}
function suggestModels() {
  const run = state.run || (state.runs[0] && state.runs[0].name) || "";
  const base = (state.runs.find((r) => r.name === run) || {}).model || "smollm2-135m-instruct";
  if (!$("compareModels").value && run) $("compareModels").value = `base=${base}, tuned=${run}`;
  if (!$("chatA").value) $("chatA").value = base;
  if (!$("chatB").value && run) $("chatB").value = run;
  for (const id of ["evalRun", "exportRun", "serveRun"]) if (run && [...$(id).options].some((o) => o.value === run)) $(id).value = run;
}
async function boot() {
  document.body.append(h("datalist", {id: "filesList"}));
  if (!state.info) {
    try { await refreshInfo(); } catch (error) { return; }
  }
  state.schema = await api("GET", "/api/schema");
  buildForm();
  const recipe = await api("GET", "/api/data/recipe").catch(() => "");
  if (!$("recipe").value) $("recipe").value = recipe;
  $("dataFile").addEventListener("change", () => {
    const train = $("cfg-data-train");
    if (train && !train.value) { train.value = $("dataFile").value; scheduleCheck(); }
  });
  if ($("dataFile").value && !$("cfg-data-train").value) $("cfg-data-train").value = $("dataFile").value;
  await refreshRuns();
  checkConfig();
  showTab(location.hash.slice(1) || "data");
  applyLanguage();
  setInterval(refreshJobs, 3000);
  setInterval(() => { if (!document.hidden) refreshRuns(); }, 5000);
  setInterval(() => { if (state.run && state.runStatus && ["running", "stopping"].includes(state.runStatus.status)) refreshDetail(); }, 2000);
  document.body.dataset.ready = "true";
}

window.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("#tabs button")) button.addEventListener("click", () => showTab(button.dataset.tab));
  $("lang").addEventListener("click", () => { state.lang = state.lang === "zh" ? "en" : "zh"; localStorage.setItem("lmforge-lang", state.lang); applyLanguage(); });
  $("token").value = state.token;
  $("token").addEventListener("change", () => { state.token = $("token").value.trim(); localStorage.setItem("lmforge-token", state.token); banner(""); boot(); });
  $("uploadFile").addEventListener("change", uploadFile);
  $("inspectBtn").addEventListener("click", inspect);
  $("cleanBtn").addEventListener("click", clean);
  $("splitBtn").addEventListener("click", split);
  $("downloadYaml").addEventListener("click", downloadYaml);
  $("startBtn").addEventListener("click", startRun);
  $("stopBtn").addEventListener("click", stopRun);
  $("resumeBtn").addEventListener("click", resumeRun);
  $("evalBtn").addEventListener("click", evaluateRun);
  $("compareBtn").addEventListener("click", compareModels);
  $("chatBtn").addEventListener("click", chatBoth);
  $("exportBtn").addEventListener("click", exportRun);
  $("serveBtn").addEventListener("click", startServe);
  $("serveStop").addEventListener("click", stopServe);
  applyLanguage();
  boot();
});
