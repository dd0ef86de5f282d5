"""Every row of the README's error table, triggered for real: its code, status and message, over REST
(a real server on a socket) and in `sqlinfer sql`.

Rows tested elsewhere, with the same exactness: UNAUTHENTICATED, PERMISSION_DENIED, REQUEST_TOO_LARGE,
INTERNAL_ERROR and the OpenAI error shape (test_api_guard.py), SECRET_KEY_UNAVAILABLE
(test_secret_key.py), ENGINE_UNAVAILABLE (test_fallback.py, it needs an engine start), and
TEMPORARILY_UNAVAILABLE for an unreachable --server (test_cli.py), GUARDRAIL_BLOCKED
(test_guardrails.py), RESOURCE_EXHAUSTED (test_provisioned.py).
"""

from __future__ import annotations

import pytest

from engine.errors import SqlinferError
from tests.registry_helpers import local_entity, wait_until_settled

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def external(name: str, url: str, **extra) -> dict:
    return {"name": name, "config": {"served_entities": [{"external_model": {
        "name": "m", "provider": "openai", "task": "llm/v1/chat",
        "openai_config": {"openai_api_key": "{{secrets/my_scope/my_openai_api_key}}", "openai_api_base": url}}}]}} | extra


def expect(response, status: int, code: str, message: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error_code"] == code, body
    assert message in body["message"], body["message"]


def test_the_callers_input(server, admin):
    expect(admin.post("/api/2.0/serving-endpoints", json={"name": "x", "config": local_entity(), "colour": "red"}),
           400, "INVALID_PARAMETER_VALUE", "colour: unknown field 'colour'; remove it")
    expect(admin.post("/api/2.0/serving-endpoints", content=b"{not json"),
           400, "MALFORMED_REQUEST", "the request body is not valid JSON: Expecting property name enclosed in double quotes")
    expect(admin.get("/api/2.0/serving-endpoints/nope"),
           404, "RESOURCE_DOES_NOT_EXIST", "endpoint 'nope' does not exist; list endpoints with GET /api/2.0/serving-endpoints")
    expect(admin.get("/api/2.0/no-such-route"), 404, "ENDPOINT_NOT_FOUND", "no API at GET /api/2.0/no-such-route")
    expect(admin.delete("/api/2.0/secrets/put"), 405, "METHOD_NOT_ALLOWED", "DELETE /api/2.0/secrets/put is not allowed")
    expect(admin.post("/api/2.0/secrets/scopes/create", json={"scope": "my_scope"}),
           409, "RESOURCE_ALREADY_EXISTS", "secret scope 'my_scope' already exists")


def test_a_conflicting_update(server, admin, gate):
    admin.post("/api/2.0/serving-endpoints", json={"name": "busy", "config": local_entity()}).raise_for_status()
    wait_until_settled(admin, "busy")
    gate.clear()  # the next deployment waits: the endpoint stays IN_PROGRESS
    admin.put("/api/2.0/serving-endpoints/busy/config", json=local_entity()).raise_for_status()
    expect(admin.put("/api/2.0/serving-endpoints/busy/config", json=local_entity()),
           409, "RESOURCE_CONFLICT", "endpoint 'busy' is already updating to config version 2")
    gate.set()


def test_upstream_failures_say_whose_fault_they_are(server, admin, upstream, monkeypatch):
    monkeypatch.setenv("SQLINFER_PROVIDER_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("SQLINFER_PROVIDER_BASE_DELAY", "0.01")
    admin.post("/api/2.0/serving-endpoints", json=external("ext", upstream.url)).raise_for_status()
    wait_until_settled(admin, "ext")
    upstream.faults.append(("status", 401))  # the provider refuses the endpoint's key
    expect(admin.post("/serving-endpoints/ext/invocations", json=CHAT),
           502, "UPSTREAM_AUTHENTICATION_FAILED", "the model could not answer: provider answered HTTP 401: scripted failure 401")
    upstream.faults.extend([("status", 500), ("status", 500)])  # down, retried, gave up
    down = admin.post("/serving-endpoints/ext/invocations", json=CHAT)
    expect(down, 503, "TEMPORARILY_UNAVAILABLE", "provider answered HTTP 500")
    assert "(gave up after 2 attempts)" in down.json()["message"]
    admin.put("/api/2.0/serving-endpoints/ext/rate-limits",
              json={"rate_limits": [{"calls": 1, "key": "user", "renewal_period": "minute"}]}).raise_for_status()
    assert admin.post("/serving-endpoints/ext/invocations", json=CHAT).status_code == 200
    limited = admin.post("/serving-endpoints/ext/invocations", json=CHAT)
    expect(limited, 429, "REQUEST_LIMIT_EXCEEDED", "rate limit")
    assert int(limited.headers["Retry-After"]) >= 1
    assert "sk-test-DO-NOT-LEAK" not in str(upstream.calls[0][1]) and all("DO-NOT-LEAK" not in r.text for r in (down, limited))


def test_a_model_that_cannot_be_loaded_here(server, admin, tmp_path):
    import shutil

    from engine.model_store import resolve_model

    copy = tmp_path / "model-copy"
    shutil.copytree(resolve_model("all-minilm-l6-v2").path, copy)
    server.service.register_local_model("fragile", str(copy))
    admin.post("/api/2.0/serving-endpoints", json={"name": "fragile", "config": local_entity("fragile")}).raise_for_status()
    assert wait_until_settled(admin, "fragile")["state"]["ready"] == "READY"
    (copy / "config.json").unlink()  # the installation broke after deployment
    expect(admin.post("/serving-endpoints/fragile/invocations", json={"input": "x"}),
           503, "MODEL_UNAVAILABLE", f"model directory {str(copy)!r} has no config.json")


SQL_ROWS = [
    # (query, extra CLI flags, code, message)
    ("SELECT ai_query('system-echo', 'x', modelParameters => {'temperature': 9})", [],
     "AI_FUNCTION_INVALID_MODEL_PARAMETERS", "modelParameters.temperature = 9 is invalid"),
    ("SELECT ai_query('system-echo', 'x', failOnError => 'yes')", [],
     "AI_FUNCTION_INVALID_ARGUMENT", "failOnError must be a BOOLEAN (true or false), got a VARCHAR; write failOnError => false"),
    ("SELECT ai_query('system-echo', 'x', returnType => 'INT', responseFormat => 'STRUCT<a INT>')", [],
     "AI_FUNCTION_INVALID_ARGUMENT", "give returnType or responseFormat, not both"),
    ("SELECT ai_query('system-echo', 42)", [],
     "AI_FUNCTION_INVALID_ARGUMENT", "request must be a STRING (the user message) or a STRUCT of named fields, got INTEGER 42"),
    ("SELECT ai_query('system-echo', 'seven', returnType => 'INT')", [],
     "AI_FUNCTION_HTTP_PARSE_CAST_ERROR", "ai_query failed on endpoint 'system-echo' for request 'seven': the answer does not fit returnType INT"),
    ("SELECT ai_summarize('some text', -1)", [],
     "AI_FUNCTION_INVALID_MAX_WORDS", "The maximum number of words must be a non-negative integer, but got -1."),
    ("SELECT ai_query('system-echo', 'one two three four')", ["--max-tokens", "1"],
     "AI_FUNCTION_BUDGET_EXCEEDED", "before running (estimate):"),
    ("SELECT ai_query('no-such-endpoint', 'x')", [],
     "RESOURCE_DOES_NOT_EXIST", "endpoint 'no-such-endpoint' does not exist; known endpoints:"),
    ("SELEC 1", [], "SQL_ERROR", 'Parser Error: syntax error at or near "SELEC"'),
]


@pytest.mark.parametrize(("query", "flags", "code", "message"), SQL_ROWS, ids=[row[2] + ":" + row[0][:30] for row in SQL_ROWS])
def test_sqlinfer_sql_reports_each_class_with_its_code(query, flags, code, message, capsys):
    from connectors.cli import main

    assert main(["sql", "--no-progress", *flags, query]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"error: {code}: "), error
    assert message in error, error
    assert "INTERNAL_ERROR" not in error


def test_a_failing_row_in_sql_names_its_cause(tmp_path, upstream, monkeypatch, capsys):
    from connectors.cli import main
    from serving.control.service import EndpointService

    home = tmp_path / "home"
    service = EndpointService(home)
    service.secrets.create_scope("s")
    service.secrets.put("s", "k", "sk-wrong")
    service.create(external("bad-key", upstream.url) | {"config": {"served_entities": [{"external_model": {
        "name": "m", "provider": "openai", "task": "llm/v1/chat",
        "openai_config": {"openai_api_key": "{{secrets/s/k}}", "openai_api_base": upstream.url}}}]}})
    service.wait_for_deployments()
    monkeypatch.setenv("SQLINFER_HOME", str(home))
    upstream.faults.append(("status", 401))
    assert main(["sql", "--no-progress", "SELECT ai_query('bad-key', 'hello')"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: AI_FUNCTION_ROW_FAILED: ai_query failed on endpoint 'bad-key' for request 'hello': "
                            "provider answered HTTP 401"), error
    assert "sk-wrong" not in error


def test_every_error_class_has_its_own_code():
    import ai_functions.errors  # noqa: F401  (load every class of the tree)
    import connectors.duckdb  # noqa: F401
    import serving.errors  # noqa: F401

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    classes = {cls for cls in subclasses(SqlinferError) if not cls.__name__.startswith("_")} | {SqlinferError}
    codes = {}
    for cls in classes:
        assert cls.error_code not in codes, f"{cls.__name__} and {codes.get(cls.error_code)} share {cls.error_code}"
        codes[cls.error_code] = cls.__name__
    assert len(codes) >= 24
