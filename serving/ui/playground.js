// The AI Playground: one conversation sent to one to three chat endpoints side by side.
//
// Each pane streams its answer from the OpenAI-compatible route (POST
// /serving-endpoints/chat/completions, stream: true) and shows its tokens, time to first token,
// total time and cost (prices from the usage route; none set: "no price"). Each pane keeps its
// own answers, so a follow-up question goes to each model with what that model said.
// "Get code" writes the conversation as ai_query SQL, OpenAI SDK, MLflow deployments and curl.

import { enc, get, stream } from "./api.js";
import { errorBox, h, money, number, replace } from "./dom.js";

const MAX_PANES = 3;

function pyString(value) { return JSON.stringify(value); }  // a JSON string is a Python string literal
// A Python literal of a JSON value (True/False/None outside strings only), indented by 4.
function pyValue(value, indent = "") {
  const inner = indent + "    ";
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number" || typeof value === "string") return JSON.stringify(value);
  if (Array.isArray(value)) {
    return value.length ? "[\n" + value.map((v) => inner + pyValue(v, inner)).join(",\n") + ",\n" + indent + "]" : "[]";
  }
  const entries = Object.entries(value);
  return entries.length ? "{\n" + entries.map(([k, v]) => `${inner}${JSON.stringify(k)}: ${pyValue(v, inner)}`).join(",\n") + ",\n" + indent + "}" : "{}";
}
function sqlString(value) { return "'" + value.replace(/'/g, "''") + "'"; }
function shellString(value) { return "'" + value.replace(/'/g, "'\\''") + "'"; }

export function codeFor(endpoint, messages, params) {
  const origin = location.origin;
  const lastUser = [...messages].reverse().find((m) => m.role === "user");
  const sqlParams = Object.entries(params).filter(([k]) => k !== "stop")
    .map(([k, v]) => `'${k}': ${Number.isInteger(v) ? v : v.toFixed(2)}`).join(", ");
  const kwargs = Object.entries(params).map(([k, v]) => `    ${k}=${pyValue(v, "    ")},`).join("\n");
  return {
    "SQL (ai_query)": [
      "-- DuckDB with sqlinfer: the SQL tab, sqlinfer sql \"...\", or connectors.duckdb.connect().",
      "-- ai_query sends one user message per row: the system prompt and earlier turns are not part of it.",
      "SELECT ai_query(",
      `  ${sqlString(endpoint)},`,
      `  ${sqlString(lastUser ? lastUser.content : "")}` + (sqlParams ? "," : ""),
      sqlParams ? `  modelParameters => {${sqlParams}}` : null,
      ") AS answer;"].filter((l) => l !== null).join("\n"),
    "Python (OpenAI SDK)": [
      "import os",
      "",
      "from openai import OpenAI",
      "",
      `client = OpenAI(base_url=${pyString(origin + "/serving-endpoints")}, api_key=os.environ["DATABRICKS_TOKEN"])`,
      "response = client.chat.completions.create(",
      `    model=${pyString(endpoint)},`,
      `    messages=${pyValue(messages, "    ")},`,
      kwargs,
      ")",
      "print(response.choices[0].message.content)"].join("\n"),
    "Python (MLflow deployments)": [
      "import os",
      "",
      "from mlflow.deployments import get_deploy_client",
      "",
      `os.environ.setdefault("DATABRICKS_HOST", ${pyString(origin)})  # and DATABRICKS_TOKEN: your token`,
      "client = get_deploy_client(\"databricks\")",
      `response = client.predict(endpoint=${pyString(endpoint)}, inputs=${pyValue({ messages, ...params })})`,
      "print(response[\"choices\"][0][\"message\"][\"content\"])"].join("\n"),
    "curl": [
      `curl -s ${origin}/serving-endpoints/${enc(endpoint)}/invocations \\`,
      "  -H \"Authorization: Bearer $DATABRICKS_TOKEN\" -H \"Content-Type: application/json\" \\",
      `  -d ${shellString(JSON.stringify({ messages, ...params }))}`].join("\n"),
  };
}

async function priceOf(name) {
  try {
    const usage = await get(`/api/2.0/sqlinfer/serving-endpoints/${enc(name)}/usage?window_minutes=1&buckets=1`);
    return usage.price;
  } catch (_) {
    return null;
  }
}

export async function playground(view, preselected) {
  // The chat endpoints this user may query (viewing is not enough), as the registry lists them.
  const { endpoints = [] } = await get("/api/2.0/serving-endpoints");
  const chat = endpoints.filter((e) => e.task === "llm/v1/chat" && (e.state || {}).ready === "READY" &&
    (e.name.startsWith("system-") || ["CAN_QUERY", "CAN_MANAGE"].includes(e.permission_level))).map((e) => e.name);
  if (!chat.length) return replace(view, h("h1", {}, "Playground"), h("p", {}, "You may query no chat endpoint."));
  const first = preselected && chat.includes(decodeURIComponent(preselected)) ? decodeURIComponent(preselected)
    : chat.find((n) => n.startsWith("system-") && n.includes("instruct")) || chat[0];
  const userTurns = [];
  const panes = [];
  const paneRow = h("div", { class: "panes" });
  const system = h("textarea", { id: "system-prompt", rows: 2, placeholder: "You are a helpful assistant." });
  const maxTokens = h("input", { id: "max-tokens", type: "number", min: 1, max: 4096, value: 128 });
  const temperature = h("input", { id: "temperature", type: "number", min: 0, max: 2, step: 0.1, value: 0 });
  const topP = h("input", { id: "top-p", type: "number", min: 0, max: 1, step: 0.05, value: 1 });
  const stop = h("input", { id: "stop", placeholder: "comma-separated" });
  const prompt = h("textarea", { id: "prompt", rows: 3, placeholder: "Ask something (Ctrl+Enter sends)" });
  const send = h("button", { type: "submit" }, "Send");
  const addButton = h("button", { type: "button", class: "secondary", onclick: () => addPane(chat.find((n) => !panes.some((p) => p.select.value === n)) || chat[0]) }, "Add endpoint to compare");
  const codeBox = h("section", { id: "code", hidden: true });
  const clear = h("button", { type: "button", class: "secondary", onclick: () => {
    userTurns.length = 0;
    panes.forEach((p) => { p.answers = []; p.firstTurn = 0; replace(p.log); });
  } }, "Clear");

  const params = () => {
    const p = { max_tokens: Number(maxTokens.value), temperature: Number(temperature.value), top_p: Number(topP.value) };
    const stops = stop.value.split(",").map((s) => s.trim()).filter(Boolean);
    if (stops.length) p.stop = stops;
    return p;
  };
  // A pane's conversation: the turns since it was added, each with its own answer; a turn it
  // failed is left out (user then user again is refused by some providers).
  const messagesFor = (pane) => {
    const messages = system.value.trim() ? [{ role: "system", content: system.value.trim() }] : [];
    userTurns.forEach((turn, i) => {
      if (i < pane.firstTurn || pane.answers[i] === null) return;
      messages.push({ role: "user", content: turn });
      if (pane.answers[i] !== undefined) messages.push({ role: "assistant", content: pane.answers[i] });
    });
    return messages;
  };

  function addPane(name) {
    if (panes.length >= MAX_PANES) return;
    const index = panes.length;
    const select = h("select", { id: `pane-${index}-endpoint`, "aria-label": `Endpoint ${index + 1}` }, chat.map((n) => h("option", { value: n, selected: n === name }, n)));
    const log = h("div", { class: "log", "aria-live": "polite" });
    const remove = h("button", { type: "button", class: "link", onclick: () => {
      panes.splice(panes.indexOf(pane), 1); pane.el.remove(); addButton.disabled = false;
    } }, "Remove");
    const pane = { select, log, answers: [], firstTurn: userTurns.length, el: h("article", { class: "pane", "data-pane": index }, h("div", { class: "pane-head" }, select, index ? remove : null), log) };
    panes.push(pane);
    paneRow.append(pane.el);
    addButton.disabled = panes.length >= MAX_PANES;
  }

  async function ask(pane, turn) {
    const endpoint = pane.select.value;
    pane.log.append(h("p", { class: "msg user" }, userTurns[turn]));
    const text = h("span", { class: "text" });
    const stats = h("p", { class: "stats" }, "streaming…");
    pane.log.append(h("div", { class: "msg assistant", "data-turn": turn }, text, stats));
    const started = performance.now();
    let firstToken = null, usage = null, answer = "", chunks = 0;
    try {
      await stream("/serving-endpoints/chat/completions",
        { model: endpoint, messages: messagesFor(pane), stream: true, stream_options: { include_usage: true }, ...params() },
        (chunk) => {
          if (chunk.usage) usage = chunk.usage;
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) {
            if (firstToken === null) firstToken = performance.now() - started;
            chunks += 1;
            answer += delta.content;
            text.textContent = answer;
          }
        });
      pane.answers[turn] = answer;
      const total = performance.now() - started;
      const price = await priceOf(endpoint);
      const cost = usage && price ? (usage.prompt_tokens * price.input_per_million + usage.completion_tokens * price.output_per_million) / 1e6 : null;
      replace(stats,
        h("span", { class: "tokens", "data-tokens": usage ? usage.completion_tokens : chunks }, `${number(usage ? usage.completion_tokens : chunks)} tokens`),
        usage ? ` (${number(usage.prompt_tokens)} in)` : "",
        ` · first token ${number(firstToken, 0)} ms · ${number(total, 0)} ms · ${price ? money(cost) : "no price"}`);
      stats.dataset.chunks = String(chunks);  // streamed deltas received (tests check it streamed)
      stats.dataset.done = "true";
    } catch (error) {
      pane.answers[turn] = null;
      replace(stats, errorBox(error));
      stats.dataset.done = "error";
    }
  }

  function showCode() {
    const which = h("select", { id: "code-endpoint", "aria-label": "Code for endpoint" },
      panes.map((p, index) => h("option", { value: index }, `${p.select.value} (pane ${index + 1})`)));
    const tabs = h("div", { role: "tablist", class: "tabs" });
    const body = h("pre", { id: "code-text", tabindex: 0 });
    const copied = h("span", { class: "help", "aria-live": "polite" });
    let current = "Python (OpenAI SDK)";
    const draw = () => {
      const pane = panes[Number(which.value)] || panes[0];
      // The request that produced the last answers: the conversation up to the last question.
      const messages = messagesFor(pane);
      if (messages.length && messages[messages.length - 1].role === "assistant") messages.pop();
      const code = codeFor(pane.select.value, messages, params());
      replace(tabs, Object.keys(code).map((label) => h("button", { type: "button", role: "tab", "aria-selected": String(label === current),
        onclick: () => { current = label; draw(); } }, label)));
      body.textContent = code[current];
    };
    which.addEventListener("change", draw);
    draw();
    replace(codeBox, h("h2", {}, "Get code"), which, tabs, body,
      h("button", { type: "button", id: "copy-code", onclick: async () => {
        try { await navigator.clipboard.writeText(body.textContent); replace(copied, " Copied."); }
        catch (_) { replace(copied, " Select the text and copy it (the browser refused the clipboard)."); }
      } }, "Copy"), copied,
      h("p", { class: "help" }, "Set DATABRICKS_TOKEN to your token first; the code never contains it."));
    codeBox.hidden = false;
  }

  const busy = (on) => {  // one turn at a time: a second would be sent without the first's answers
    for (const button of [send, clear, addButton, ...paneRow.querySelectorAll("button")]) button.disabled = on;
    if (!on) addButton.disabled = panes.length >= MAX_PANES;
  };
  const form = h("form", { class: "composer", onsubmit: async (event) => {
    event.preventDefault();
    if (send.disabled) return;  // Ctrl+Enter while a turn is streaming
    const turn = prompt.value.trim();
    if (!turn) return prompt.focus();
    userTurns.push(turn);
    prompt.value = "";
    busy(true);
    try {
      await Promise.all(panes.map((pane) => ask(pane, userTurns.length - 1)));
    } finally {
      busy(false);
      if (!codeBox.hidden) showCode();
      prompt.focus();
    }
  } }, h("label", { for: "prompt" }, "Message"), prompt,
    h("div", { class: "actions" }, send,
      h("button", { type: "button", class: "secondary", onclick: showCode }, "Get code"),
      clear));
  prompt.addEventListener("keydown", (event) => { if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) form.requestSubmit(); });

  addPane(first);
  replace(view,
    h("div", { class: "title" }, h("h1", {}, "AI Playground"), addButton),
    h("details", { class: "settings", open: true }, h("summary", {}, "System prompt and parameters"),
      h("label", { for: "system-prompt" }, "System prompt"), system,
      h("div", { class: "params" },
        h("label", {}, "Max tokens ", maxTokens), h("label", {}, "Temperature ", temperature),
        h("label", {}, "Top-p ", topP), h("label", {}, "Stop ", stop))),
    paneRow, form, codeBox);
  prompt.focus();
}
