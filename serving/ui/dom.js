// Building the page: elements from data, never HTML from data.
//
// Every value a server or a model sent is set as text (textContent, attributes), so an answer
// that looks like HTML stays text. The Content-Security-Policy (serving/api/ui.py) is the second
// line: no inline script runs, and nothing loads from elsewhere.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key === "value") el.value = value;
    else if (key === "checked") el.checked = Boolean(value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

export function when(ms) {
  if (!ms) return "";
  return new Date(ms).toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

export function number(value, digits = 0) {
  if (value === null || value === undefined) return "–";
  return Number(value).toLocaleString(undefined, { maximumFractionDigits: digits, minimumFractionDigits: 0 });
}

export function money(value) {
  if (value === null || value === undefined) return "no price";
  return "$" + Number(value).toFixed(value < 0.01 ? 6 : 4);
}

export function table(columns, rows, caption) {
  return h("table", {},
    caption ? h("caption", {}, caption) : null,
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, rows.map((cells) => h("tr", {}, cells.map((c) => h("td", {}, c))))));
}

// Any error: the server's (ApiError: its code, then its message), or a script's own (its message).
export function errorBox(error) {
  const code = error && error.code ? `${error.code}: ` : "";
  return h("p", { class: "error", role: "alert" }, code + (error && error.message ? error.message : String(error)));
}

export function json(value) {
  return h("pre", { class: "json" }, JSON.stringify(value, null, 2));
}
