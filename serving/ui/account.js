// The secrets page (scopes and key names, never values) and the signed-in user's tokens page.

import { enc, get, post } from "./api.js";
import { errorBox, h, replace, table, when } from "./dom.js";

function failure(box, error) { replace(box, errorBox(error)); }

export async function secretsPage(view) {
  const { scopes = [] } = await get("/api/2.0/secrets/scopes/list");
  const sections = await Promise.all(scopes.map(async (scope) => {
    try {
      const { secrets = [] } = await get(`/api/2.0/secrets/list?scope=${enc(scope.name)}`);
      return h("section", { "data-scope": scope.name }, h("h2", {}, scope.name),
        secrets.length ? table(["Key", "Last updated"], secrets.map((s) => [s.key, when(s.last_updated_timestamp)])) : h("p", { class: "help" }, "No keys."));
    } catch (error) {
      return h("section", {}, h("h2", {}, scope.name), errorBox(error));
    }
  }));
  const status = h("div", { "aria-live": "polite" });
  const scopeName = h("input", { id: "new-scope", required: true });
  const putScope = h("select", { id: "put-scope" }, scopes.map((s) => h("option", { value: s.name }, s.name)));
  const putKey = h("input", { id: "put-key", required: true });
  const putValue = h("input", { id: "put-value", type: "password", autocomplete: "off", required: true });
  replace(view,
    h("h1", {}, "Secrets"),
    h("p", { class: "help" }, "Scopes you may read and their key names. Values are write-only: nothing shows them, here or over the API."),
    scopes.length ? sections : h("p", {}, "No scopes you may read."),
    h("form", { class: "card inline", onsubmit: async (event) => {
      event.preventDefault();
      try { await post("/api/2.0/secrets/scopes/create", { scope: scopeName.value.trim() }); secretsPage(view); }
      catch (error) { failure(status, error); }
    } }, h("h2", {}, "Create a scope"), h("label", { for: "new-scope" }, "Scope"), scopeName, h("button", { type: "submit" }, "Create scope")),
    scopes.length ? h("form", { class: "card inline", onsubmit: async (event) => {
      event.preventDefault();
      try {
        await post("/api/2.0/secrets/put", { scope: putScope.value, key: putKey.value.trim(), string_value: putValue.value });
        putValue.value = "";
        secretsPage(view);
      } catch (error) { failure(status, error); }
    } }, h("h2", {}, "Put a secret"), h("label", { for: "put-scope" }, "Scope"), putScope, h("label", { for: "put-key" }, "Key"), putKey,
      h("label", { for: "put-value" }, "Value"), putValue, h("button", { type: "submit" }, "Put secret"),
      h("p", { class: "help" }, "Reference it as {{secrets/<scope>/<key>}} in an endpoint's config.")) : null,
    status);
}

export async function tokensPage(view) {
  const { token_infos = [] } = await get("/api/2.0/token/list");
  const status = h("div", { "aria-live": "polite" });
  const comment = h("input", { id: "token-comment" });
  const days = h("input", { id: "token-days", type: "number", min: 1, max: 730, value: 90 });
  replace(view,
    h("h1", {}, "Your tokens"),
    table(["Comment", "Created", "Expires", ""], token_infos.map((t) => [t.comment || "–", when(t.creation_time),
      t.expiry_time && t.expiry_time > 0 ? when(t.expiry_time) : "never",
      h("button", { type: "button", class: "link", onclick: async () => {
        try { await post("/api/2.0/token/delete", { token_id: t.token_id }); tokensPage(view); } catch (error) { failure(status, error); }
      } }, "Revoke")])),
    h("form", { class: "card inline", onsubmit: async (event) => {
      event.preventDefault();
      try {
        const made = await post("/api/2.0/token/create", { comment: comment.value.trim() || undefined, lifetime_seconds: Number(days.value) * 86400 });
        await tokensPage(view);
        view.append(h("div", { class: "card new-token", role: "status" },
          h("p", {}, "Your new token; it is shown once, copy it now:"), h("code", { id: "new-token" }, made.token_value)));
      } catch (error) { failure(status, error); }
    } }, h("h2", {}, "Generate a token"), h("label", { for: "token-comment" }, "Comment"), comment,
      h("label", { for: "token-days" }, "Lifetime (days)"), days, h("button", { type: "submit" }, "Generate")),
    status);
}
