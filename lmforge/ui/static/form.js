// The Train tab's form, generated from the config's JSON schema (GET /api/schema): one field per key of every section,
// its type, choices and default from the schema, its description (the field's docstring) beside it. No key is
// re-mapped by hand; values that differ from the default become the config sent to /api/config/preview.
// Uses board.js's state, h, t and scheduleCheck (classic scripts share globals; this file loads first).
"use strict";
const SECTION_OPEN = {model: true, method: true, data: true, train: true, preference: false};
const HIDDEN = new Set(["train.output_dir"]);  // the board keeps every run in runs/<name>

function fieldKind(prop) {
  const options = prop.anyOf || [prop];
  const nullable = options.some((o) => o.type === "null");
  const main = options.filter((o) => o.type !== "null");
  if (main.length === 1 && main[0].enum) return {kind: "select", options: main[0].enum, nullable, numeric: main[0].type === "integer"};
  if (main.some((o) => o.type === "array")) return {kind: "list", consts: main.filter((o) => o.const).map((o) => o.const)};
  const type = main[0] && main[0].type;
  if (type === "boolean") return {kind: "bool"};
  if (type === "integer" || type === "number") return {kind: "number", integer: type === "integer", nullable};
  return {kind: "text", nullable};
}
function showValue(kind, value) {
  if (value === null || value === undefined) return "";
  if (kind.kind === "list") return Array.isArray(value) ? value.join(", ") : String(value);
  return String(value);
}
function buildField(path, prop) {
  const kind = fieldKind(prop);
  const id = `cfg-${path.replace(".", "-")}`;
  let input;
  if (kind.kind === "select") input = h("select", {id}, kind.nullable ? h("option", {value: ""}, "—") : null,
    kind.options.map((o) => h("option", {value: String(o)}, String(o))));
  else if (kind.kind === "bool") input = h("input", {id, type: "checkbox"});
  else if (kind.kind === "number") input = h("input", {id, type: "number", step: kind.integer ? "1" : "any"});
  else input = h("input", {id, type: "text", list: path === "model.name_or_path" ? "modelsList" : path.startsWith("data.") ? "filesList" : null});
  if (kind.kind === "bool") input.checked = Boolean(prop.default); else input.value = showValue(kind, prop.default);
  input.dataset.path = path;
  input.addEventListener("input", scheduleCheck);
  input.addEventListener("change", scheduleCheck);
  state.fields.push({path, kind, input, default: prop.default});
  const description = prop.description || "";
  return h("div", {class: "field"}, h("label", {for: id, title: description}, path.split(".").pop()), input,
    h("small", {class: "help"}, description.split(/(?<=\.)\s/)[0]), h("div", {class: "err", id: `err-${path}`}));
}
function buildForm() {
  const schema = state.schema, form = $("configForm");
  state.fields = [];
  form.replaceChildren(h("fieldset", {}, h("legend", {"data-i18n": "section_run"}, t("section_run")),
    buildField("name", schema.properties.name)));
  for (const [section, prop] of Object.entries(schema.properties)) {
    if (!prop.$ref) continue;
    const def = schema.$defs[prop.$ref.split("/").pop()];
    const fields = Object.entries(def.properties).filter(([k]) => !HIDDEN.has(`${section}.${k}`))
      .map(([k, p]) => buildField(`${section}.${k}`, p));
    form.append(h("details", {open: SECTION_OPEN[section], id: `section-${section}`},
      h("summary", {"data-i18n": `section_${section}`}, t(`section_${section}`)), ...fields));
  }
  const models = [...state.info.models.map((m) => m.alias), ...state.info.local_models];
  document.body.append(h("datalist", {id: "modelsList"}, models.map((m) => h("option", {value: m}))));
  const name = $("cfg-name");
  if (name.value === "run") name.value = `run-${new Date().toISOString().slice(5, 16).replace(/[-T:]/g, "")}`;
}
function readValue(field) {
  const {kind, input} = field;
  if (kind.kind === "bool") return input.checked;
  const text = input.value.trim();
  if (text === "") return kind.kind === "list" ? [] : null;
  if (kind.kind === "number") return Number(text);
  if (kind.kind === "select") return kind.numeric ? Number(text) : text;
  if (kind.kind === "list") return kind.consts.includes(text) ? text : text.split(",").map((s) => s.trim()).filter(Boolean);
  return text;
}
function formConfig() {
  const config = {};
  for (const field of state.fields) {
    const value = readValue(field);
    if (JSON.stringify(value) === JSON.stringify(field.default ?? (field.kind.kind === "list" ? [] : null))) continue;
    const parts = field.path.split(".");
    if (parts.length === 1) config[parts[0]] = value;
    else (config[parts[0]] = config[parts[0]] || {})[parts[1]] = value;
  }
  return config;
}
