// Create or edit an endpoint: a local model, an external provider (its key as a secret
// reference), or an MLflow-registered model. One served entity per form; traffic splits across
// several are set with the API (PUT .../config).
//
// The server validates; the form only builds the Databricks request. The server's message names
// the field (e.g. "config.served_entities[0].external_model.openai_config.openai_api_key: ..."),
// and the form shows it under the input whose path it names. The server saves nothing on error.

import { ApiError, enc, get, post, put } from "./api.js";
import { errorBox, h, replace } from "./dom.js";

const E = "config.served_entities[0]";
const X = `${E}.external_model`;
const KEY_FIELD = { openai: "openai_config.openai_api_key", anthropic: "anthropic_config.anthropic_api_key",
  custom: "custom_provider_config.bearer_token_auth.token" };
const BASE_FIELD = { openai: "openai_config.openai_api_base", custom: "custom_provider_config.custom_provider_url" };

function field(path, label, input, help) {
  const id = path.replace(/[^a-z0-9]+/gi, "-");
  input.id = id;
  input.dataset.path = path;
  const message = h("p", { class: "field-error", id: `${id}-error`, "aria-live": "polite" });
  input.setAttribute("aria-describedby", `${id}-error${help ? ` ${id}-help` : ""}`);
  return h("div", { class: "field", "data-field": path }, h("label", { for: id }, label), input,
    help ? h("p", { class: "help", id: `${id}-help` }, help) : null, message);
}

function set(form, path, value) {
  const input = form.querySelector(`[data-path="${path}"]`);
  if (input && value !== undefined && value !== null) input.type === "checkbox" ? (input.checked = value) : (input.value = value);
}

function value(form, path) {
  const input = form.querySelector(`[data-path="${path}"]`);
  if (!input) return undefined;
  if (input.type === "checkbox") return input.checked;
  return input.value.trim() || undefined;
}

// What the GET view adds to a served entity; the config routes refuse it as unknown fields.
const VIEW_ONLY = ["state", "creator", "creation_timestamp"];
const KIND_FIELDS = ["external_model", "entity_name", "entity_version", "workload_size", "scale_to_zero_enabled"];

// The served entity to send: the one being edited (so the fields this form does not show, such
// as environment_vars or openai_organization, are kept), with the form's fields over it.
function entityOf(form, kind, base) {
  const entity = JSON.parse(JSON.stringify(base || {}));
  for (const key of VIEW_ONLY) delete entity[key];
  const sameKind = kind === (entity.external_model ? "external" : entity.entity_version ? "mlflow" : "local");
  const previous = sameKind ? entity.external_model : undefined;
  for (const key of KIND_FIELDS) delete entity[key];
  entity.name = value(form, `${E}.name`);
  if (kind === "external") {
    const provider = value(form, `${X}.provider`);
    const kept = previous && previous.provider === provider ? previous : {};
    const external = { ...kept, name: value(form, `${X}.name`), provider, task: value(form, `${X}.task`) };
    for (const dotted of [KEY_FIELD[provider], BASE_FIELD[provider]].filter(Boolean)) {  // the form's, not the old ones
      const parts = dotted.split(".");
      let at = external;
      for (const part of parts.slice(0, -1)) {
        if (!at[part]) { at = null; break; }  // nothing there to clear (and no empty object made)
        at = at[part] = { ...at[part] };
      }
      if (at) delete at[parts[parts.length - 1]];
    }
    const nest = (dotted, v) => {
      if (v === undefined) return;
      const parts = dotted.split(".");
      let at = external;
      for (const part of parts.slice(0, -1)) at = at[part] = at[part] || {};
      at[parts[parts.length - 1]] = v;
    };
    nest(KEY_FIELD[provider], value(form, `${X}.key`));
    if (BASE_FIELD[provider]) nest(BASE_FIELD[provider], value(form, `${X}.base`));
    // A key that was cleared leaves an empty auth object behind: a custom provider needs none.
    const auth = external.custom_provider_config && external.custom_provider_config.bearer_token_auth;
    if (auth && !Object.keys(auth).length) delete external.custom_provider_config.bearer_token_auth;
    if (provider === "custom" && !external.custom_provider_config) external.custom_provider_config = {};
    entity.external_model = external;
  } else {
    entity.entity_name = value(form, `${E}.entity_name`);
    if (kind === "mlflow") entity.entity_version = value(form, `${E}.entity_version`);
    else {
      entity.workload_size = value(form, `${E}.workload_size`);
      entity.scale_to_zero_enabled = value(form, `${E}.scale_to_zero_enabled`);
    }
  }
  return JSON.parse(JSON.stringify(entity));  // drops undefined
}

// The input an error message names: the longest path (with or without "config.") it contains.
// The provider-specific key and URL inputs stand for each provider's own field names. Inputs
// of the kinds not shown do not count; a top-level name counts only as the message's subject.
function inputFor(form, message) {
  let best = null, length = 0;
  for (const input of form.querySelectorAll("[data-path]")) {
    const path = input.dataset.path;
    if (!path || input.disabled && path !== "name" || input.closest("[hidden]")) continue;
    if (!path.includes(".")) {
      if (message.startsWith(`${path}:`) && path.length > length) { best = input; length = path.length; }
      continue;
    }
    const provider = value(form, `${X}.provider`);
    const real = path === `${X}.key` ? `${X}.${KEY_FIELD[provider]}` : path === `${X}.base` && BASE_FIELD[provider] ? `${X}.${BASE_FIELD[provider]}` : path;
    const leaf = real.split(".").pop();
    for (const candidate of [real, real.replace(/^config\./, ""), leaf.length >= 10 ? leaf : null]) {
      if (candidate && message.includes(candidate) && candidate.length > length) { best = input; length = candidate.length; }
    }
  }
  return best;
}

export async function endpointForm(view, name) {
  const existing = name ? await get(`/api/2.0/serving-endpoints/${enc(name)}`) : null;
  const current = existing ? (existing.pending_config || existing.config || {}) : null;
  if (current && (current.served_entities || []).length > 1) {
    return replace(view, h("h1", {}, `Edit ${name}`),
      h("p", {}, `${name} serves ${current.served_entities.length} entities with a traffic split; the form edits one. `,
        "Change it with PUT /api/2.0/serving-endpoints/{name}/config (", h("a", { href: "/docs" }, "API docs"), ") or ",
        h("code", {}, "sqlinfer endpoints update-config"), "."),
      h("a", { class: "button secondary", href: `#/endpoints/${enc(name)}` }, "Back"));
  }
  const { endpoints = [] } = await get("/api/2.0/serving-endpoints");
  const bundled = endpoints.filter((e) => e.name.startsWith("system-")).map((e) => e.name.slice("system-".length));
  const kindInputs = [["local", "Local model"], ["external", "External provider"], ["mlflow", "MLflow model"]].map(([v, label]) =>
    h("label", { class: "radio" }, h("input", { type: "radio", name: "kind", value: v, checked: v === "local" }), ` ${label}`));
  const problem = h("div", { "aria-live": "polite" });
  const groups = {
    local: h("fieldset", { "data-kind": "local" }, h("legend", {}, "Local model"),
      field(`${E}.entity_name`, "Model", h("input", { list: "bundled" }), "A bundled or registered local model (sqlinfer models)."),
      h("datalist", { id: "bundled" }, bundled.map((b) => h("option", { value: b }))),
      field(`${E}.workload_size`, "Workload size", h("select", {}, ["Small", "Medium", "Large"].map((s) => h("option", { value: s }, s)))),
      field(`${E}.scale_to_zero_enabled`, "Scale to zero when idle", h("input", { type: "checkbox" }))),
    external: h("fieldset", { "data-kind": "external" }, h("legend", {}, "External provider"),
      field(`${X}.provider`, "Provider", h("select", {}, ["openai", "anthropic", "custom"].map((p) => h("option", { value: p }, p)))),
      field(`${X}.task`, "Task", h("select", {}, ["llm/v1/chat", "llm/v1/completions", "llm/v1/embeddings"].map((t) => h("option", { value: t }, t)))),
      field(`${X}.name`, "Provider's model name", h("input", { placeholder: "gpt-4o-mini" })),
      field(`${X}.key`, "API key (secret reference)", h("input", { placeholder: "{{secrets/my_scope/openai_key}}", autocomplete: "off" }),
        "Put the key with the Secrets page first; the endpoint stores only the reference."),
      field(`${X}.base`, "API base URL", h("input", { placeholder: "https://api.openai.com/v1" }), "Optional for OpenAI; required for custom providers.")),
    mlflow: h("fieldset", { "data-kind": "mlflow" }, h("legend", {}, "MLflow model"),
      field(`${E}.mlflow_entity_name`, "Registered model name", h("input", { "data-mlflow": "" })),
      field(`${E}.entity_version`, "Version", h("input", { inputmode: "numeric" }))),
  };
  // The local and MLflow kinds both set entity_name: only the visible kind's input carries its path.
  const mlflowName = groups.mlflow.querySelector("input[data-mlflow]");
  const localName = groups.local.querySelector(`[data-path="${E}.entity_name"]`);
  const form = h("form", { class: "card", novalidate: true },
    h("h1", {}, name ? `Edit ${name}` : "Create serving endpoint"),
    field("name", "Endpoint name", h("input", { required: true, disabled: Boolean(name) }), "Letters, digits, - and _."),
    h("fieldset", { class: "kinds" }, h("legend", {}, "Serves"), kindInputs),
    groups.local, groups.external, groups.mlflow,
    field(`${E}.name`, "Served entity name (optional)", h("input", {})),
    name ? null : field("tags", "Tags (optional)", h("input", { placeholder: "team=search, env=dev" })),
    h("div", { class: "actions" },
      h("button", { type: "submit" }, name ? "Update endpoint" : "Create endpoint"),
      h("a", { class: "button secondary", href: name ? `#/endpoints/${enc(name)}` : "#/endpoints" }, "Cancel")),
    problem);
  const kind = () => form.querySelector("input[name=kind]:checked").value;
  const show = () => {
    for (const [k, group] of Object.entries(groups)) {
      group.hidden = k !== kind();
      for (const input of group.querySelectorAll("input, select")) input.disabled = k !== kind();
    }
    localName.dataset.path = kind() === "local" ? `${E}.entity_name` : "";
    mlflowName.dataset.path = kind() === "mlflow" ? `${E}.entity_name` : "";
  };
  // Anthropic takes no base URL here: hide the input rather than drop what is typed into it.
  const baseField = groups.external.querySelector(`[data-field="${X}.base"]`);
  const showProvider = () => {
    const none = !BASE_FIELD[value(form, `${X}.provider`)];
    baseField.hidden = none;
    baseField.querySelector("input").disabled = none || kind() !== "external";
  };
  form.addEventListener("change", (event) => {
    if (event.target.name === "kind") show();
    showProvider();
  });
  show();

  if (existing) {
    set(form, "name", existing.name);
    const entity = (current.served_entities || [])[0] || {};
    const chosen = entity.external_model ? "external" : entity.entity_version ? "mlflow" : "local";
    form.querySelector(`input[name=kind][value=${chosen}]`).checked = true;
    show();
    set(form, `${E}.name`, entity.name);
    set(form, `${E}.entity_name`, entity.entity_name);
    set(form, `${E}.entity_version`, entity.entity_version);
    set(form, `${E}.workload_size`, entity.workload_size);
    set(form, `${E}.scale_to_zero_enabled`, entity.scale_to_zero_enabled);
    const external = entity.external_model;
    if (external) {
      set(form, `${X}.provider`, external.provider);
      set(form, `${X}.task`, external.task);
      set(form, `${X}.name`, external.name);
      const dig = (dotted) => dotted.split(".").reduce((at, part) => (at || {})[part], external);
      set(form, `${X}.key`, dig(KEY_FIELD[external.provider] || ""));
      set(form, `${X}.base`, dig(BASE_FIELD[external.provider] || ""));
    }
  } else {
    set(form, `${E}.entity_name`, bundled.find((b) => b.includes("instruct")) || bundled[0]);
  }
  showProvider();

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    for (const message of form.querySelectorAll(".field-error")) replace(message);
    for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
    replace(problem);
    const entity = entityOf(form, kind(), current && (current.served_entities || [])[0]);
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      if (name) {
        await put(`/api/2.0/serving-endpoints/${enc(name)}/config`, { served_entities: [entity] });
      } else {
        const tags = (value(form, "tags") || "").split(",").map((t) => t.trim()).filter(Boolean).map((t) => {
          const [key, ...rest] = t.split("=");
          return rest.length ? { key: key.trim(), value: rest.join("=").trim() } : { key: key.trim() };
        });
        await post("/api/2.0/serving-endpoints", { name: value(form, "name"), config: { served_entities: [entity] }, ...(tags.length ? { tags } : {}) });
      }
      location.hash = `#/endpoints/${enc(name || value(form, "name"))}`;
    } catch (error) {
      const message = error instanceof ApiError ? error.message : String(error);
      const input = error instanceof ApiError && error.status < 500 ? inputFor(form, message) : null;
      if (input) {
        input.setAttribute("aria-invalid", "true");
        replace(form.querySelector(`#${input.id}-error`), message);
        input.focus();
      } else {
        replace(problem, errorBox(error));
      }
    } finally {
      button.disabled = false;
    }
  });
  replace(view, form);
  form.querySelector("input:not([disabled])").focus();
}
