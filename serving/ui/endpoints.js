// The endpoints list and an endpoint's page.
//
// Everything here is read from the public REST API: the Databricks routes
// (/api/2.0/serving-endpoints, /api/2.0/permissions/...) and sqlinfer's read-only insight routes
// (usage buckets, config history, inference-table rows) under /api/2.0/sqlinfer/serving-endpoints.
// A section the user may not read says so instead of failing the page.

import { ApiError, enc, get } from "./api.js";
import { lineChart } from "./charts.js";
import { errorBox, h, json, money, number, replace, table, when } from "./dom.js";

export function stateOf(endpoint) {
  const state = endpoint.state || {};
  if (state.config_update === "IN_PROGRESS") return { label: state.ready === "READY" ? "Updating" : "Not ready (deploying)", cls: "updating" };
  if (state.config_update === "UPDATE_FAILED" && state.ready !== "READY") return { label: "Not ready (update failed)", cls: "failed" };
  if (state.ready === "READY") {
    const entities = (endpoint.config && endpoint.config.served_entities) || [];
    const idle = entities.some((e) => ((e.state && e.state.deployment_state_message) || "").startsWith("Scaled to zero"));
    if (idle) return { label: "Scaled to zero", cls: "idle" };
    return { label: state.config_update === "UPDATE_FAILED" ? "Ready (last update failed)" : "Ready", cls: "ready" };
  }
  return { label: "Not ready", cls: "failed" };
}

function badge(endpoint) {
  const state = stateOf(endpoint);
  return h("span", { class: `badge ${state.cls}`, "data-state": state.cls }, state.label);
}

function entityLabel(entity) {
  if (entity.external_model) return `${entity.external_model.provider}: ${entity.external_model.name}`;
  return entity.entity_name + (entity.entity_version ? ` v${entity.entity_version}` : "");
}

export function servedEntities(config) {
  const entities = (config && config.served_entities) || [];
  const routes = ((config && config.traffic_config) || {}).routes || [];
  return entities.map((entity) => {
    const route = routes.find((r) => (r.served_model_name || r.served_entity_name) === entity.name);
    const share = route ? route.traffic_percentage : entities.length === 1 ? 100 : null;
    return { name: entity.name || entityLabel(entity), model: entityLabel(entity), share, entity };
  });
}

function matches(endpoint, filter) {
  if (!filter) return true;
  const text = filter.toLowerCase();
  if (endpoint.name.toLowerCase().includes(text)) return true;
  return (endpoint.tags || []).some((tag) => {
    const pair = `${tag.key}=${tag.value ?? ""}`.toLowerCase();
    return pair.includes(text) || tag.key.toLowerCase() === text;
  });
}

export async function endpointList(view) {
  const { endpoints = [] } = await get("/api/2.0/serving-endpoints");
  const filter = h("input", { id: "filter", type: "search", placeholder: "name or tag (key=value)" });
  const body = h("tbody");
  const count = h("p", { class: "help", "aria-live": "polite" });
  const draw = () => {
    const shown = endpoints.filter((e) => matches(e, filter.value.trim()));
    replace(count, `${shown.length} of ${endpoints.length} endpoints`);
    replace(body, shown.map((e) => {
      const config = e.config || e.pending_config;
      return h("tr", { "data-endpoint": e.name },
        h("td", {}, h("a", { href: `#/endpoints/${enc(e.name)}` }, e.name),
          (e.tags || []).map((t) => h("span", { class: "tag" }, t.value ? `${t.key}=${t.value}` : t.key))),
        h("td", {}, badge(e)),
        h("td", {}, servedEntities(config).map((s) => h("div", {}, s.model, s.share !== null ? ` · ${s.share}%` : ""))),
        h("td", {}, e.task || "custom"),
        h("td", {}, e.creator),
        h("td", {}, when(e.last_updated_timestamp)));
    }));
  };
  filter.addEventListener("input", draw);
  draw();
  replace(view,
    h("div", { class: "title" }, h("h1", {}, "Serving endpoints"), h("a", { class: "button", href: "#/create" }, "Create endpoint")),
    h("label", { for: "filter" }, "Filter"), filter, count,
    h("table", { id: "endpoints" },
      h("thead", {}, h("tr", {}, ["Name", "State", "Served entities (traffic)", "Task", "Creator", "Last updated"].map((c) => h("th", { scope: "col" }, c)))),
      body));
}

// A section that loads on its own: a refusal (403) or failure shows in place of its content.
function section(title, id, load) {
  const content = h("div", {}, h("p", { class: "help" }, "Loading…"));
  const el = h("section", { id, "aria-labelledby": `${id}-title` }, h("h2", { id: `${id}-title` }, title), content);
  Promise.resolve().then(load).then(
    (children) => replace(content, children),
    (error) => replace(content, error instanceof ApiError && error.status === 403
      ? h("p", { class: "help denied" }, error.message) : errorBox(error)));
  return el;
}

const WINDOWS = [["15 minutes", 15], ["1 hour", 60], ["24 hours", 1440], ["7 days", 10080]];

function usageSection(name) {
  const select = h("select", { id: "window" }, WINDOWS.map(([label, minutes]) => h("option", { value: minutes, selected: minutes === 60 }, label)));
  const charts = h("div", { class: "charts" });
  const load = async () => {
    const usage = await get(`/api/2.0/sqlinfer/serving-endpoints/${enc(name)}/usage?window_minutes=${select.value}&buckets=30`);
    const t = usage.totals;
    const price = usage.price ? `${money(usage.price.input_per_million)} / ${money(usage.price.output_per_million)} per million input / output tokens` : "no price set (SQLINFER_PRICES)";
    replace(charts,
      h("p", { class: "totals", id: "usage-totals" },
        `${number(t.requests)} requests, ${number(t.errors)} errors, ${number(t.input_tokens)} input + ${number(t.output_tokens)} output tokens, `,
        `p50 ${number(t.latency_ms_p50, 1)} ms, p99 ${number(t.latency_ms_p99, 1)} ms, cost ${money(t.cost)} · ${price}`),
      h("div", { class: "grid" },
        lineChart("Requests", usage.buckets, [{ key: "requests", label: "requests" }, { key: "errors", label: "errors" }]),
        lineChart("Tokens", usage.buckets, [{ key: "input_tokens", label: "input" }, { key: "output_tokens", label: "output" }]),
        lineChart("Latency", usage.buckets, [{ key: "latency_ms_p50", label: "p50", summary: false }, { key: "latency_ms_p90", label: "p90", summary: false },
          { key: "latency_ms_p99", label: "p99", summary: false }], "ms"),
        usage.price ? lineChart("Cost", usage.buckets, [{ key: "cost", label: "cost" }], "$") : null));
  };
  select.addEventListener("change", () => load().catch((e) => replace(charts, errorBox(e))));
  return section("Usage", "usage", async () => {
    await load();
    return [h("label", { for: "window" }, "Window "), select, charts];
  });
}

function permissionsOf(acl) {
  const rows = (acl.access_control_list || []).map((entry) => [
    entry.user_name || entry.group_name || entry.service_principal_name,
    (entry.all_permissions || []).map((p) => p.permission_level + (p.inherited ? " (inherited)" : "")).join(", ")]);
  return table(["Principal", "Permission"], rows);
}

export async function endpointPage(view, name) {
  const endpoint = await get(`/api/2.0/serving-endpoints/${enc(name)}`);
  if ((endpoint.state || {}).config_update === "IN_PROGRESS") {
    // Deploying: look again shortly, while the page is still the one on screen.
    const here = location.hash;
    setTimeout(() => { if (location.hash === here) endpointPage(view, name).catch(() => {}); }, 1500);
  }
  const system = name.startsWith("system-");
  const config = endpoint.config;
  const pending = endpoint.pending_config;
  const canManage = endpoint.permission_level === "CAN_MANAGE";
  replace(view,
    h("div", { class: "title" },
      h("h1", {}, endpoint.name, " ", badge(endpoint)),
      h("div", { class: "actions" },
        canManage && !system ? h("a", { class: "button", href: `#/edit/${enc(name)}` }, "Edit endpoint") : null,
        h("a", { class: "button secondary", href: `#/playground?endpoint=${enc(name)}` }, "Open in Playground"))),
    h("dl", { class: "facts" },
      h("dt", {}, "Task"), h("dd", {}, endpoint.task || "custom"),
      h("dt", {}, "Creator"), h("dd", {}, endpoint.creator),
      h("dt", {}, "Created"), h("dd", {}, when(endpoint.creation_timestamp)),
      h("dt", {}, "Last updated"), h("dd", {}, when(endpoint.last_updated_timestamp)),
      h("dt", {}, "Your permission"), h("dd", {}, endpoint.permission_level),
      h("dt", {}, "Tags"), h("dd", {}, (endpoint.tags || []).map((t) => h("span", { class: "tag" }, t.value ? `${t.key}=${t.value}` : t.key)), (endpoint.tags || []).length ? null : "none"),
      endpoint.description ? [h("dt", {}, "Description"), h("dd", {}, endpoint.description)] : null),
    h("section", { id: "entities" }, h("h2", {}, "Served entities and traffic"),
      table(["Served entity", "Model", "Traffic", "State"], servedEntities(config || pending).map((s) => [
        s.name, s.model, s.share === null ? "–" : `${s.share}%`,
        (s.entity.state && (s.entity.state.deployment_state_message || s.entity.state.deployment)) || "–"]))),
    h("section", { id: "config" }, h("h2", {}, "Configuration"),
      config ? h("details", { open: !pending }, h("summary", {}, `Current: version ${config.config_version}`), json(config)) : h("p", {}, "No configuration is serving yet."),
      pending ? h("details", { open: true }, h("summary", {}, `Pending: version ${pending.config_version} (started ${when(pending.start_time)})`), json(pending)) : null),
    system ? null : section("Version history", "history", async () => {
      const { versions = [] } = await get(`/api/2.0/sqlinfer/serving-endpoints/${enc(name)}/config-history`);
      return table(["Version", "Outcome", "Created", "Config"], versions.map((v) => [
        String(v.config_version), v.outcome, when(v.created_timestamp), h("details", {}, h("summary", {}, "show"), json(v.config))]));
    }),
    h("section", { id: "limits" }, h("h2", {}, "Rate limits and AI Gateway"),
      endpoint.rate_limits ? json(endpoint.rate_limits) : null,
      endpoint.ai_gateway ? json(endpoint.ai_gateway) : h("p", {}, "No AI Gateway settings.")),
    system ? null : section("Permissions", "permissions", async () => permissionsOf(await get(`/api/2.0/permissions/serving-endpoints/${enc(endpoint.id)}`))),
    usageSection(name),
    system ? null : section("Inference table", "inference", async () => {
      const { rows = [] } = await get(`/api/2.0/sqlinfer/serving-endpoints/${enc(name)}/inference-rows?limit=20`);
      if (!rows.length) return h("p", { class: "help" }, "No rows. Payloads are kept when ai_gateway.inference_table_config.enabled is true.");
      const preview = (value) => { const text = JSON.stringify(value); return text.length > 160 ? text.slice(0, 157) + "…" : text; };
      return table(["Time", "Requester", "Status", "Request", "Response"], rows.map((r) => [
        when(r.timestamp_ms), r.requester || "–", String(r.status_code ?? "–"),
        h("details", {}, h("summary", {}, preview(r.request)), json(r.request)),
        h("details", {}, h("summary", {}, preview(r.response)), json(r.response))]));
    }));
}
