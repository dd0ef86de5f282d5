"""The Serving UI in a real browser: Debian's chromium driven by Playwright, against a real server.

One server and one browser for the module, walked through as a user would: sign in, list
endpoints, put a secret, create an external endpoint (a form error under the field it names,
fixed, saved, ready), see its usage chart and inference rows after queries, edit it, stream an
answer from the bundled chat
model in the Playground, compare two endpoints side by side, run the Python that "Get code"
copied, EXPLAIN and run a 20-row query in the SQL tab, and check that a user without permission
neither sees an endpoint nor can query it from the UI. The external provider is the scripted
OpenAI-protocol server on 127.0.0.1 (tests/fake_providers.py); everything else is real.

Screenshots of each page are taken on every run, into a temporary folder; `make screenshots`
runs this module with SQLINFER_SCREENSHOTS=docs/screenshots to refresh the README's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BUNDLED_CHAT = "system-smollm2-135m-instruct"
EXTERNAL = "ui-gpt"
SECRET = "sk-ui-test-secret-value-0123456789"
WAIT_MODEL_MS = 600_000  # the bundled engine's first start on a slow machine; never a speed check


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The server (in this process, so it shares the bundled engine with the other tests), the
    scripted provider, and tokens for an admin and for bob, who has no permission on anything."""
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is missing: `make test` installs it (apt-get install -y chromium)")
    from serving.control.service import EndpointService
    from tests.fake_providers import ScriptedOpenAIServer
    from tests.rest_server import RunningServer

    previous = os.environ.get("SQLINFER_PRICES")
    os.environ["SQLINFER_PRICES"] = f"{EXTERNAL}=0.15/0.60"
    upstream = ScriptedOpenAIServer()
    service = EndpointService(tmp_path_factory.mktemp("ui-home"))
    server = RunningServer(service)
    _, admin = service.auth.create_token("admin@example.com", is_admin=True)
    _, bob = service.auth.create_token("bob@example.com")
    shots = Path(os.environ.get("SQLINFER_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    try:
        yield {"server": server, "upstream": upstream, "admin": admin, "bob": bob, "shots": shots}
    finally:
        server.stop()
        upstream.stop()
        if previous is None:
            os.environ.pop("SQLINFER_PRICES", None)
        else:
            os.environ["SQLINFER_PRICES"] = previous


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


def signed_in(browser, stack, token):
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=stack["server"].url)
    page = context.new_page()
    page.set_default_timeout(30_000)
    problems = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.goto(stack["server"].url + "/")
    page.keyboard.type(token)  # the token field has the focus: signing in needs no mouse
    page.keyboard.press("Enter")
    page.wait_for_selector("#endpoints")
    page.problems = problems
    page.shots = stack["shots"]
    return page


@pytest.fixture(scope="module")
def admin_page(browser, stack):
    page = signed_in(browser, stack, stack["admin"])
    yield page
    assert page.problems == []  # no script error on any page
    page.context.close()


def shot(page, name, folder=None):
    page.screenshot(path=str((folder or page.shots) / f"{name}.png"), full_page=True)


def test_sign_in_refuses_a_wrong_token_then_lists_endpoints(browser, stack, admin_page):
    context = browser.new_context()
    page = context.new_page()
    page.goto(stack["server"].url + "/")
    page.fill("#token", "sqli_not-a-real-token")
    page.get_by_role("button", name="Sign in").click()
    assert "UNAUTHENTICATED" in page.locator("[role=alert]").inner_text()
    shot(page, "sign-in", stack["shots"])
    context.close()

    rows = admin_page.locator("#endpoints tbody tr")
    names = rows.evaluate_all("rows => rows.map(r => r.dataset.endpoint)")
    assert BUNDLED_CHAT in names and "system-all-minilm-l6-v2" in names
    chat_row = admin_page.locator(f"tr[data-endpoint='{BUNDLED_CHAT}']")
    assert chat_row.locator(".badge").inner_text() == "Ready"
    assert "llm/v1/chat" in chat_row.inner_text() and "100%" in chat_row.inner_text()
    shot(admin_page, "endpoints")
    admin_page.fill("#filter", "minilm")
    assert admin_page.locator("#endpoints tbody tr").evaluate_all("rows => rows.map(r => r.dataset.endpoint)") == [
        "system-all-minilm-l6-v2"]
    admin_page.fill("#filter", "")


def test_a_secret_is_put_and_only_its_key_is_shown(admin_page, stack):
    admin_page.goto(stack["server"].url + "/#/secrets")
    admin_page.fill("#new-scope", "ui")
    admin_page.get_by_role("button", name="Create scope").click()
    admin_page.wait_for_selector("#put-key")
    admin_page.select_option("#put-scope", "ui")
    admin_page.fill("#put-key", "openai")
    admin_page.fill("#put-value", SECRET)
    admin_page.get_by_role("button", name="Put secret").click()
    admin_page.wait_for_selector("section[data-scope='ui'] td:text('openai')")
    assert SECRET not in admin_page.content()
    shot(admin_page, "secrets")


def test_create_an_external_endpoint_error_under_its_field_then_ready(admin_page, stack):
    page = admin_page
    page.goto(stack["server"].url + "/#/create")
    page.fill("#name", EXTERNAL)
    page.check("input[name=kind][value=external]")
    page.select_option("[data-path$='external_model.provider']", "openai")
    page.fill("[data-path$='external_model.name']", "gpt-4o-mini")
    page.fill("[data-path$='external_model.key']", SECRET)  # a pasted key instead of a secret reference
    page.fill("[data-path$='external_model.base']", stack["upstream"].url)
    page.get_by_role("button", name="Create endpoint").click()
    key_field = page.locator("[data-field$='external_model.key']")
    key_error = key_field.locator(".field-error")
    key_error.wait_for()
    assert "openai_api_key" in key_error.inner_text() and "secret reference" in key_error.inner_text()
    assert key_field.locator("input").get_attribute("aria-invalid") == "true"
    assert SECRET not in page.content().replace(f'value="{SECRET}"', "")  # the error does not echo it
    shot(page, "create-endpoint-error")
    assert EXTERNAL not in stack["server"].service.names()  # nothing half-saved

    page.fill("[data-path$='external_model.key']", "{{secrets/ui/openai}}")
    page.get_by_role("button", name="Create endpoint").click()
    page.wait_for_url(f"**/#/endpoints/{EXTERNAL}")
    page.wait_for_selector(".badge[data-state=ready]", timeout=60_000)
    assert page.locator("#entities").inner_text().count("openai: gpt-4o-mini") == 1


def test_the_endpoint_page_charts_usage_after_queries(admin_page, stack):
    with stack["server"].client(stack["admin"]) as client:
        client.put(f"/api/2.0/serving-endpoints/{EXTERNAL}/ai-gateway",
                   json={"inference_table_config": {"enabled": True}}).raise_for_status()
        for word in ("one", "two", "three"):
            client.post(f"/serving-endpoints/{EXTERNAL}/invocations",
                        json={"messages": [{"role": "user", "content": word}]}).raise_for_status()
    stack["server"].app.state.usage.flush()
    page = admin_page
    page.goto(stack["server"].url + f"/#/endpoints/{EXTERNAL}")
    page.reload()
    requests = page.locator("figure[data-chart='Requests']")
    requests.wait_for()
    assert requests.locator(".legend").inner_text().startswith("requests: 3")
    assert page.locator("figure[data-chart='Requests'] polyline").count() == 2  # requests and errors
    assert page.locator("figure[data-chart='Cost']").count() == 1  # a price is set for this endpoint
    assert "3 requests, 0 errors" in page.locator("#usage-totals").inner_text()
    page.locator("#history td").first.wait_for()
    assert page.locator("#history tbody tr").count() == 1  # version 1
    page.locator("#inference tbody tr").first.wait_for()
    rows = page.locator("#inference tbody tr")
    assert rows.count() == 3
    assert '"content": "three"' in rows.first.locator("td").nth(3).inner_text().replace('":"', '": "')  # newest first
    assert "inference_table_config" in page.locator("#limits").inner_text()
    shot(page, "endpoint")


def test_the_playground_streams_the_bundled_model_and_compares_two_endpoints(admin_page, stack):
    page = admin_page
    page.goto(stack["server"].url + "/#/playground")
    page.wait_for_selector("#prompt")
    page.select_option("#pane-0-endpoint", BUNDLED_CHAT)
    page.fill("#max-tokens", "24")
    page.fill("#prompt", "Name three colors.")
    page.get_by_role("button", name="Send").click()
    stats = page.locator("[data-pane='0'] .stats[data-done]")
    stats.wait_for(timeout=WAIT_MODEL_MS)
    assert stats.get_attribute("data-done") == "true", stats.inner_text()
    tokens = int(stats.locator(".tokens").get_attribute("data-tokens"))
    assert 1 <= tokens <= 24
    assert int(stats.get_attribute("data-chunks")) >= 2  # it arrived in pieces: streamed
    assert page.locator("[data-pane='0'] .msg.assistant .text").inner_text().strip()

    page.get_by_role("button", name="Clear").click()
    page.get_by_role("button", name="Add endpoint to compare").click()
    page.select_option("#pane-1-endpoint", EXTERNAL)
    page.fill("#prompt", "compare these words")
    calls_before = len(stack["upstream"].calls)
    page.get_by_role("button", name="Send").click()
    for pane in ("0", "1"):
        page.locator(f"[data-pane='{pane}'] .stats[data-done]").wait_for(timeout=WAIT_MODEL_MS)
    external = page.locator("[data-pane='1'] .msg.assistant")
    assert external.locator(".text").inner_text() == "compare these words"  # the provider echoes
    assert external.locator(".stats").get_attribute("data-done") == "true"
    assert "$" in external.locator(".stats").inner_text()  # priced: its cost is shown
    assert page.locator("[data-pane='0'] .stats").get_attribute("data-done") == "true"
    assert len(stack["upstream"].calls) == calls_before + 1
    shot(page, "playground")


def test_get_code_copies_python_that_runs(admin_page, stack, tmp_path):
    page = admin_page  # the conversation of the previous test is still on screen
    page.get_by_role("button", name="Get code").click()
    page.select_option("#code-endpoint", label=f"{EXTERNAL} (pane 2)")
    page.get_by_role("tab", name="Python (OpenAI SDK)").click()
    page.get_by_role("button", name="Copy").click()
    page.wait_for_selector("text=Copied.")
    code = page.evaluate("navigator.clipboard.readText()")
    assert code == page.locator("#code-text").inner_text()
    assert stack["admin"] not in code  # the token never goes into copied code
    shot(page, "get-code")
    script = tmp_path / "copied.py"
    script.write_text(code)
    ran = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env=os.environ | {"DATABRICKS_TOKEN": stack["admin"]})
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "compare these words"

    page.get_by_role("tab", name="SQL (ai_query)").click()
    sql = page.locator("#code-text").inner_text()
    assert f"ai_query(\n  '{EXTERNAL}',\n  'compare these words'," in sql


def test_the_sql_tab_explains_then_runs_a_20_row_query(admin_page, stack):
    page = admin_page
    page.goto(stack["server"].url + "/#/sql")
    page.fill("#statement", f"SELECT i, ai_query('{BUNDLED_CHAT}', 'Say the number ' || i::VARCHAR, "
                            "modelParameters => {'max_tokens': 6}) AS answer FROM range(20) t(i) ORDER BY i")
    page.get_by_role("button", name="Explain").click()
    totals = page.locator("#plan-totals")
    totals.wait_for()
    assert totals.inner_text().startswith("20 rows, 1 AI call sites, 20 requests to send")
    page.get_by_role("button", name="Run").click()
    page.wait_for_selector("#run-state:not([data-state=RUNNING]):not([data-state=PENDING])", timeout=WAIT_MODEL_MS)
    assert page.locator("#run-state").get_attribute("data-state") == "SUCCEEDED"
    assert page.locator("#result tbody tr").count() == 20
    assert page.locator("progress").get_attribute("value") == "20"
    summary = page.locator("#summary").inner_text()
    assert summary.startswith("ai functions: 20 rows (0 NULL") and "20 requests" in summary
    shot(page, "sql")


def test_the_edit_form_updates_the_config_and_history_shows_both_versions(admin_page, stack):
    page = admin_page
    page.goto(stack["server"].url + f"/#/endpoints/{EXTERNAL}")
    page.get_by_role("link", name="Edit endpoint").click()
    page.wait_for_selector("[data-path$='external_model.name']")
    assert page.locator("#name").input_value() == EXTERNAL and page.locator("#name").is_disabled()
    assert page.locator("[data-path$='external_model.key']").input_value() == "{{secrets/ui/openai}}"
    page.fill("[data-path$='external_model.name']", "gpt-4o")
    page.get_by_role("button", name="Update endpoint").click()
    page.wait_for_url(f"**/#/endpoints/{EXTERNAL}")
    page.wait_for_selector(".badge[data-state=ready]", timeout=60_000)
    page.locator("#history tbody tr").nth(1).wait_for()
    versions = page.locator("#history tbody tr").evaluate_all("rows => rows.map(r => r.cells[0].innerText + ' ' + r.cells[1].innerText)")
    assert versions == ["2 READY", "1 READY"]
    assert "openai: gpt-4o" in page.locator("#entities").inner_text()


def test_a_custom_provider_needs_no_key(admin_page, stack):
    page = admin_page
    page.goto(stack["server"].url + "/#/create")
    page.fill("#name", "ui-custom")
    page.check("input[name=kind][value=external]")
    page.select_option("[data-path$='external_model.provider']", "custom")
    page.fill("[data-path$='external_model.name']", "model-x")
    page.fill("[data-path$='external_model.base']", stack["upstream"].url)
    page.get_by_role("button", name="Create endpoint").click()
    page.wait_for_url("**/#/endpoints/ui-custom")
    page.wait_for_selector(".badge[data-state=ready]", timeout=60_000)
    config = stack["server"].service.get("ui-custom")["config"]["served_entities"][0]["external_model"]
    assert config["custom_provider_config"] == {"custom_provider_url": stack["upstream"].url}


def test_tokens_page_lists_and_makes_the_users_own_tokens(admin_page, stack):
    page = admin_page
    page.goto(stack["server"].url + "/#/tokens")
    page.fill("#token-comment", "from the ui")
    page.get_by_role("button", name="Generate").click()
    value = page.locator("#new-token").inner_text()
    assert value.startswith("sqli_")
    assert stack["server"].service.auth.authenticate(f"Bearer {value}").user_name == "admin@example.com"
    assert "from the ui" in page.locator("table").inner_text()
    shot(page, "tokens")


def test_a_user_without_permission_neither_sees_nor_queries_the_endpoint(browser, stack):
    page = signed_in(browser, stack, stack["bob"])
    names = page.locator("#endpoints tbody tr").evaluate_all("rows => rows.map(r => r.dataset.endpoint)")
    assert EXTERNAL not in names and BUNDLED_CHAT in names

    page.goto(stack["server"].url + f"/#/endpoints/{EXTERNAL}")
    assert "PERMISSION_DENIED" in page.locator("[role=alert]").inner_text()

    page.goto(stack["server"].url + "/#/playground")
    page.wait_for_selector("#pane-0-endpoint")
    options = page.locator("#pane-0-endpoint option").evaluate_all("options => options.map(o => o.value)")
    assert EXTERNAL not in options and BUNDLED_CHAT in options

    # CAN_VIEW shows the endpoint in the list, but the Playground offers only what bob may query
    endpoint_id = stack["server"].service.endpoint_id(EXTERNAL)
    with stack["server"].client(stack["admin"]) as admin:
        admin.patch(f"/api/2.0/permissions/serving-endpoints/{endpoint_id}", json={
            "access_control_list": [{"user_name": "bob@example.com", "permission_level": "CAN_VIEW"}]}).raise_for_status()
    page.goto(stack["server"].url + "/#/endpoints")
    page.wait_for_selector(f"tr[data-endpoint='{EXTERNAL}']")
    page.goto(stack["server"].url + "/#/playground")
    page.wait_for_selector("#pane-0-endpoint")
    options = page.locator("#pane-0-endpoint option").evaluate_all("options => options.map(o => o.value)")
    assert EXTERNAL not in options

    calls_before = len(stack["upstream"].calls)
    page.goto(stack["server"].url + "/#/sql")
    page.fill("#statement", f"SELECT ai_query('{EXTERNAL}', 'hi')")
    page.get_by_role("button", name="Explain").click()
    assert "PERMISSION_DENIED" in page.locator("#plan [role=alert]").inner_text()
    page.evaluate("document.querySelector('#plan').replaceChildren()")
    page.get_by_role("button", name="Run").click()  # Run explains first, and stops at the refusal
    assert "PERMISSION_DENIED" in page.locator("#plan [role=alert]").inner_text()
    page.wait_for_selector("button:text('Run'):not([disabled])")
    assert page.locator("#progress").inner_text() == ""
    statements = stack["server"].app.state.statements._by_id.values()
    assert [s for s in statements if s.owner == "bob@example.com"] == []  # nothing was started
    assert len(stack["upstream"].calls) == calls_before
    assert page.problems == []
    page.context.close()


TRICKY = "it's \"quoted\", a back\\slash,\nnew line, true or null, {braces} and $HOME"


def test_get_code_quotes_any_text_exactly(admin_page, stack):
    """The generated Python, SQL and curl carry the conversation exactly, whatever it holds."""
    import ast
    import shlex

    import duckdb

    messages = [{"role": "system", "content": TRICKY}, {"role": "user", "content": TRICKY}]
    params = {"max_tokens": 16, "temperature": 0.5, "stop": ["\n", "'"]}
    code = admin_page.evaluate("""async ([messages, params]) => {
        const { codeFor } = await import('/ui/playground.js');
        return codeFor('my-endpoint', messages, params);
    }""", [messages, params])

    call = next(node for node in ast.walk(ast.parse(code["Python (OpenAI SDK)"])) if isinstance(node, ast.Call)
                and any(k.arg == "messages" for k in node.keywords))
    keywords = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    assert keywords == {"model": "my-endpoint", "messages": messages, **params}

    predict = next(node for node in ast.walk(ast.parse(code["Python (MLflow deployments)"])) if isinstance(node, ast.Call)
                   and any(k.arg == "inputs" for k in node.keywords))
    assert ast.literal_eval(next(k.value for k in predict.keywords if k.arg == "inputs")) == {"messages": messages, **params}

    curl = shlex.split(code["curl"].replace("\\\n", " "))
    import json
    assert json.loads(curl[curl.index("-d") + 1]) == {"messages": messages, **params}

    sql = code["SQL (ai_query)"]
    prompt_literal = sql.split("'my-endpoint',\n  ", 1)[1].split(",\n  modelParameters", 1)[0]
    assert duckdb.sql(f"SELECT {prompt_literal}").fetchall() == [(TRICKY,)]


def test_pages_fit_a_small_laptop_without_sideways_scrolling(admin_page, stack):
    page = admin_page
    page.set_viewport_size({"width": 1024, "height": 700})
    try:
        for route, ready in (("#/endpoints", "#endpoints"), (f"#/endpoints/{BUNDLED_CHAT}", "figure[data-chart='Requests']"),
                             ("#/playground", "#prompt"), ("#/sql", "#statement"), ("#/create", "#name")):
            page.goto(stack["server"].url + "/" + route)
            page.wait_for_selector(ready)
            width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
            assert width[0] <= width[1], (route, width)
    finally:
        page.set_viewport_size({"width": 1366, "height": 900})
