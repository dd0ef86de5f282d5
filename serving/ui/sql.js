// The SQL tab: a DuckDB statement with ai_query/ai_embed, explained before it runs.
//
// "Explain" asks POST /api/2.0/sqlinfer/sql/explain: rows, calls, tokens, cost and time of each
// AI call, with no model called. "Run" starts the statement (POST /api/2.0/sql/statements,
// Databricks' Statement Execution API) and polls it, showing the AI rows done (of the rows
// EXPLAIN counted), tokens and cost as they grow, then the result table and the summary line.

import { enc, get, post } from "./api.js";
import { errorBox, h, money, number, replace, table } from "./dom.js";

const EXAMPLE = `SELECT i AS n,
       ai_query('system-smollm2-135m-instruct', 'Name an animal that starts with the letter ' || chr(65 + i::INTEGER),
                modelParameters => {'max_tokens': 8}) AS answer
FROM range(20) t(i)`;

let lastText = null;  // the editor keeps its text when the user leaves the tab and comes back

export async function sqlTab(view) {
  const editor = h("textarea", { id: "statement", rows: 8, spellcheck: "false", "aria-describedby": "statement-help" });
  editor.value = lastText ?? EXAMPLE;
  editor.addEventListener("input", () => { lastText = editor.value; });
  const plan = h("section", { id: "plan", "aria-live": "polite" });
  const progress = h("section", { id: "progress", "aria-live": "polite" });
  const result = h("section", { id: "result" });
  let expectedRows = null;
  let running = null;

  const explain = async () => {
    replace(plan, h("p", { class: "help" }, "Explaining…"));
    try {
      const answer = await post("/api/2.0/sqlinfer/sql/explain", { statement: editor.value });
      const t = answer.totals;
      expectedRows = t.rows;
      replace(plan, h("h2", {}, "Before it runs"),
        h("p", { class: "totals", id: "plan-totals" },
          `${number(t.rows)} rows, ${number(answer.calls.length)} AI call sites, ${number(t.to_send)} requests to send, `,
          `≤ ${number(t.tokens)} tokens, cost ${money(t.cost)}, time ${t.seconds === null ? "unknown" : `~${number(t.seconds, 1)} s`}`),
        answer.calls.length ? table(["Function", "Endpoint", "Rows", "To send", "Input tokens", "Output tokens ≤", "Cost", "Time"],
          answer.calls.map((c) => [c.function, c.endpoint, number(c.rows), number(c.to_send),
            number(c.input_tokens) + (c.tokens_exact ? "" : " (approx.)"), number(c.output_tokens), money(c.cost),
            c.seconds === null ? "unknown" : `~${number(c.seconds, 1)} s`])) : h("p", {}, "No AI function calls: nothing to pay for."));
      return true;
    } catch (error) {
      replace(plan, errorBox(error));
      return false;
    }
  };

  const show = (statement) => {
    const p = statement.sqlinfer_progress || {};
    const state = statement.status.state;
    replace(progress, h("h2", {}, "Run"),
      h("p", { id: "run-state", "data-state": state }, state.toLowerCase(), ` · ${number(p.elapsed_seconds, 1)} s`),
      expectedRows ? h("progress", { max: expectedRows, value: Math.min(p.ai_rows || 0, expectedRows), "aria-label": "AI rows done" }) : null,
      h("p", { class: "totals" }, `${number(p.ai_rows)}${expectedRows ? ` of ${number(expectedRows)}` : ""} AI rows, `,
        `${number(p.requests)} requests, ${number(p.input_tokens)} + ${number(p.output_tokens)} tokens, ${number(p.errors)} errors, cost ${money(p.cost)}`),
      p.summary && state !== "RUNNING" ? h("p", { id: "summary", class: "summary" }, `ai functions: ${p.summary}`) : null,
      statement.status.error ? errorBox({ code: statement.status.error.error_code, message: statement.status.error.message }) : null);
    if (statement.result && statement.manifest) {
      const columns = statement.manifest.schema.columns;
      replace(result, h("h2", {}, "Result"),
        h("p", { class: "help" }, `${number(statement.manifest.total_row_count)} rows` +
          (statement.manifest.truncated ? `, first ${number(statement.result.row_count)} shown` : "")),
        h("div", { class: "scroll" }, table(columns.map((c) => `${c.name} ${c.type_text}`),
          statement.result.data_array.map((row) => row.map((v) => (v === null ? "NULL" : v))))));
    }
  };

  const run = async () => {
    if (runButton.disabled) return;  // Ctrl+Enter while a run is going
    runButton.disabled = true;
    if (!(await explain())) { runButton.disabled = false; return; }
    replace(result);
    cancelButton.disabled = false;
    try {
      let statement = await post("/api/2.0/sql/statements", { statement: editor.value, wait_timeout: "0s", row_limit: 1000 });
      running = statement.statement_id;
      show(statement);
      while (["PENDING", "RUNNING"].includes(statement.status.state) && progress.isConnected) {  // stop polling once the tab is left
        await new Promise((resolve) => setTimeout(resolve, 400));
        statement = await get(`/api/2.0/sql/statements/${enc(running)}`);
        show(statement);
      }
    } catch (error) {
      replace(progress, errorBox(error));
    } finally {
      running = null;
      runButton.disabled = false;
      cancelButton.disabled = true;
    }
  };

  const explainButton = h("button", { type: "button", class: "secondary", onclick: explain }, "Explain");
  const runButton = h("button", { type: "submit" }, "Run");
  const cancelButton = h("button", { type: "button", class: "secondary", disabled: true, onclick: () => {
    if (running) post(`/api/2.0/sql/statements/${enc(running)}/cancel`).catch((error) => replace(progress, errorBox(error)));
  } }, "Cancel");
  editor.addEventListener("keydown", (event) => { if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); run(); } });
  replace(view,
    h("h1", {}, "SQL"),
    h("form", { class: "card", onsubmit: (event) => { event.preventDefault(); run(); } },
      h("label", { for: "statement" }, "DuckDB statement"), editor,
      h("p", { id: "statement-help", class: "help" }, "ai_query, ai_embed and the task functions (ai_classify, ai_extract, …) run as you, on endpoints you may query. ",
        "The server's files are out of reach; tables the operator shares (SQLINFER_SQL_DATA) are. Run explains first; Ctrl+Enter runs."),
      h("div", { class: "actions" }, explainButton, runButton, cancelButton)),
    plan, progress, result);
}
