// The Serving UI's shell: sign-in, navigation, and one view per route of the URL's #fragment.
//
// Views: #/endpoints, #/endpoints/<name>, #/create, #/edit/<name>, #/playground, #/sql,
// #/secrets, #/tokens. Each view module exports render(view, ...args) and draws into <main>.

import { get, session } from "./api.js";
import { h, replace, errorBox } from "./dom.js";
import { endpointList, endpointPage } from "./endpoints.js";
import { endpointForm } from "./endpoint_form.js";
import { playground } from "./playground.js";
import { sqlTab } from "./sql.js";
import { secretsPage, tokensPage } from "./account.js";

let view = document.getElementById("view");
let routed = 0;  // the current route's number: views of older routes are dropped
const nav = document.getElementById("nav");
const who = document.getElementById("who");

const ROUTES = [
  [/^#\/endpoints\/([^/]+)$/, (target, name) => endpointPage(target, decodeURIComponent(name))],
  [/^#\/edit\/([^/]+)$/, (target, name) => endpointForm(target, decodeURIComponent(name))],
  [/^#\/create$/, (target) => endpointForm(target, null)],
  [/^#\/playground(?:\?endpoint=(.+))?$/, (target, name) => playground(target, name)],
  [/^#\/sql$/, (target) => sqlTab(target)],
  [/^#\/secrets$/, (target) => secretsPage(target)],
  [/^#\/tokens$/, (target) => tokensPage(target)],
  [/^#\/endpoints$/, (target) => endpointList(target)],
];

// A fresh <main> for a new view; a view still drawing into the old one draws off screen.
function freshView() {
  const target = h("main", { id: "view", tabindex: "-1" });
  view.replaceWith(target);
  view = target;
  return target;
}

function signIn(message) {
  routed += 1;  // a view still loading (say, the one whose call found the token revoked) is dropped
  freshView();
  nav.hidden = true;
  replace(who);
  const input = h("input", { id: "token", type: "password", autocomplete: "off", required: true, "aria-describedby": "token-help" });
  const problem = h("div", { "aria-live": "polite" }, message ? errorBox({ message }) : null);
  const form = h("form", { class: "card signin", onsubmit: async (event) => {
    event.preventDefault();
    session.token = input.value.trim();
    try {
      await whoAmI();
      if (!location.hash || location.hash === "#/signin") location.hash = "#/endpoints";
      else route();
    } catch (error) {
      session.token = null;
      replace(problem, errorBox(error));
      input.focus();
    }
  } },
    h("h1", {}, "Sign in"),
    h("label", { for: "token" }, "API token"),
    input,
    h("p", { id: "token-help", class: "help" },
      "A personal access token of this server (", h("code", {}, "sqlinfer tokens create --user NAME"),
      "). The UI calls the REST API with it, so you see and do exactly what the token may."),
    h("button", { type: "submit" }, "Sign in"),
    problem);
  replace(view, form);
  input.focus();
}

async function whoAmI() {
  const me = await get("/api/2.0/preview/scim/v2/Me");
  session.user = me;
  nav.hidden = false;
  replace(who, h("span", { class: "user" }, me.userName, me.sqlinfer_is_admin ? " (admin)" : ""),
    h("button", { class: "link", type: "button", onclick: () => { session.token = null; session.user = null; signIn(); } }, "Sign out"));
}

async function route() {
  if (!session.token) return signIn();
  if (!session.user) {
    try { await whoAmI(); } catch (error) { session.token = null; return signIn(error.message); }
  }
  const hash = location.hash || "#/endpoints";
  for (const link of nav.querySelectorAll("a")) {
    const current = hash.startsWith(link.getAttribute("href")) ||
      (link.getAttribute("href") === "#/endpoints" && /^#\/(create|edit)/.test(hash));
    current ? link.setAttribute("aria-current", "page") : link.removeAttribute("aria-current");
  }
  for (const [pattern, render] of ROUTES) {
    const match = hash.match(pattern);
    if (match) {
      // Each route draws into a <main> of its own: a slow view of a route the user has already
      // left finishes into a detached element instead of overwriting the page navigated to.
      const mine = ++routed;
      const target = freshView();
      replace(target, h("p", {}, "Loading…"));
      try {
        await render(target, ...match.slice(1));
      } catch (error) {
        if (mine === routed) replace(target, errorBox(error));
      }
      return;
    }
  }
  location.hash = "#/endpoints";
}

window.addEventListener("hashchange", route);
// The skip link moves the focus to the content; as a plain #view link it would change the route.
document.querySelector(".skip").addEventListener("click", (event) => { event.preventDefault(); view.focus(); });
window.addEventListener("sqlinfer:signed-out", (event) => {
  session.token = null;
  session.user = null;
  signIn(`Your token was refused (${event.detail}); sign in again.`);
});
route();
