"""SQL statements over REST (serving/api/statements.py, connectors/sql_session.py): Databricks' Statement
Execution API shape, run in a locked-down DuckDB on the caller's behalf. A real server on a loopback
socket; every AI call goes to the scripted OpenAI-protocol provider (tests/fake_providers.py, which
echoes the last user message), never a model.

What is pinned, and why:

- the wire a Databricks client reads: states, ``manifest.schema`` (names, DuckDB type text),
  ``data_array`` values as text, ``total_row_count``/``truncated``, ``sqlinfer_progress``; and the
  usage rows are the caller's (requester) with source ``sql``, so limits and bills land on them;
- the sandbox: a statement runs on the server, so it must not read or write the server's files
  (``/etc/passwd``, the registry database), install or load extensions, unlock its configuration,
  or read the server's Python objects by name (replacement scans);
- the permission model: every endpoint a call names needs the caller's CAN_QUERY *before anything
  is sent* (EXPLAIN too), and a statement is visible only to whoever started it (404 to others,
  as if it did not exist);
- the limits: ``wait_timeout`` (0s or 5s-50s), ``row_limit``, unknown fields, and the running
  statements per user (429 + Retry-After), each refused by name;
- cancel: it reaches the provider backend too (DuckDB notices an interrupt only between chunks of
  up to 2048 rows, so a cancel must stop the requests of the chunk in hand, or they are all paid
  for), and a terminal state is final (a client that saw CANCELED never sees SUCCEEDED);
- every statement ends: a shared file that cannot be read, or a bug, is FAILED with a message,
  never a PENDING/RUNNING that a polling client waits on forever;
- EXPLAIN (no model called) and the operator's shared tables (``SQLINFER_SQL_DATA``).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from serving.data.routing import PROVIDER_CONCURRENCY
from tests.registry_helpers import external_endpoint

STATEMENTS = "/api/2.0/sql/statements"
EXPLAIN = "/api/2.0/sqlinfer/sql/explain"
EXTERNAL = "ext"
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELED", "CLOSED"}


@pytest.fixture
def endpoint_id(server, admin, upstream) -> str:
    """An external chat endpoint on the scripted provider; the admin's, nobody else may query it."""
    admin.post("/api/2.0/serving-endpoints", json=external_endpoint(EXTERNAL, upstream.url)).raise_for_status()
    server.service.wait_for_deployments()
    return admin.get(f"/api/2.0/serving-endpoints/{EXTERNAL}").json()["id"]


def user(server, name: str):
    return server.client(server.service.auth.create_token(name)[1])


def grant(admin, endpoint_id: str, user_name: str, level: str) -> None:
    admin.patch(f"/api/2.0/permissions/serving-endpoints/{endpoint_id}", json={
        "access_control_list": [{"user_name": user_name, "permission_level": level}]}).raise_for_status()


def execute(client, statement: str, **fields) -> dict:
    response = client.post(STATEMENTS, json={"statement": statement, "wait_timeout": "10s", **fields})
    assert response.status_code == 200, response.text
    return response.json()


def settled(client, statement_id: str, timeout: float = 30) -> dict:
    """Poll until the statement reaches a terminal state (or fail after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"{STATEMENTS}/{statement_id}")
        assert response.status_code == 200, response.text
        body = response.json()
        if body["status"]["state"] in TERMINAL:
            return body
        assert time.monotonic() < deadline, f"statement still {body['status']['state']} after {timeout} s"
        time.sleep(0.05)


def test_a_statement_answers_the_models_rows_and_records_usage_as_the_caller(server, admin, upstream, endpoint_id):
    body = execute(admin, f"SELECT i, ai_query('{EXTERNAL}', 'say ' || i::VARCHAR) AS a FROM range(3) t(i) ORDER BY i",
                   warehouse_id="ignored")
    assert body["status"] == {"state": "SUCCEEDED"}, body
    assert body["manifest"] == {
        "format": "JSON_ARRAY",
        "schema": {"column_count": 2, "columns": [{"name": "i", "type_text": "BIGINT", "position": 0},
                                                  {"name": "a", "type_text": "VARCHAR", "position": 1}]},
        "total_row_count": 3, "truncated": False}
    # JSON_ARRAY: every value as text; the provider echoes the user message
    assert body["result"] == {"chunk_index": 0, "row_offset": 0, "row_count": 3,
                              "data_array": [["0", "say 0"], ["1", "say 1"], ["2", "say 2"]]}
    progress = body["sqlinfer_progress"]
    # the scripted provider answers every chat with 3 prompt and 2 generated tokens
    assert {k: progress[k] for k in ("ai_rows", "requests", "errors", "input_tokens", "output_tokens", "cost")} == {
        "ai_rows": 3, "requests": 3, "errors": 0, "input_tokens": 9, "output_tokens": 6, "cost": None}
    assert progress["summary"].startswith("3 rows (0 NULL, 0 from the result store, 0 answered by an identical "
                                          "request, 0 errors), 3 requests, 9 prompt + 6 generated tokens, "), progress
    assert progress["elapsed_seconds"] >= 0
    assert sorted(call[1]["messages"][-1]["content"] for call in upstream.calls) == ["say 0", "say 1", "say 2"]

    rows = server.app.state.usage.rows(EXTERNAL)
    assert [(r["requester"], r["source"], r["status_code"], r["endpoint_id"], r["ai_function"]) for r in rows] == [
        ("admin@example.com", "sql", 200, endpoint_id, "ai_query")] * 3
    totals = admin.get(f"/api/2.0/sqlinfer/serving-endpoints/{EXTERNAL}/usage").json()["totals"]
    assert {k: totals[k] for k in ("requests", "errors", "input_tokens", "output_tokens")} == {
        "requests": 3, "errors": 0, "input_tokens": 9, "output_tokens": 6}

    # the same result, read back by its owner; a statement without AI calls has no summary
    assert admin.get(f"{STATEMENTS}/{body['statement_id']}").json()["result"] == body["result"]
    plain = execute(admin, "SELECT 42 AS answer")
    assert plain["result"]["data_array"] == [["42"]] and plain["sqlinfer_progress"]["summary"] is None
    assert plain["sqlinfer_progress"]["ai_rows"] == 0


def test_wait_timeout_0s_answers_at_once_and_polling_reaches_the_result(server, admin, upstream, endpoint_id):
    response = admin.post(STATEMENTS, json={"statement": f"SELECT ai_query('{EXTERNAL}', 'later') AS a", "wait_timeout": "0s"})
    assert response.status_code == 200, response.text
    statement_id = response.json()["statement_id"]
    assert len(statement_id) == 36
    body = settled(admin, statement_id)
    assert body["status"] == {"state": "SUCCEEDED"}
    assert body["result"]["data_array"] == [["later"]] and body["manifest"]["total_row_count"] == 1
    assert body["sqlinfer_progress"]["ai_rows"] == 1


# Each statement, and the start of the message DuckDB refuses it with. The locked configuration
# is what keeps the rest shut: a statement cannot turn external access (files, ATTACH, COPY TO,
# extension installs) back on, nor Python replacement scans.
SANDBOX = {
    "SELECT * FROM read_csv('/etc/passwd')":
        'Permission Error: Cannot access file "/etc/passwd" - file system operations are disabled by configuration',
    "SELECT * FROM read_text('/etc/hostname')":
        'Permission Error: Cannot access file "/etc/hostname" - file system operations are disabled by configuration',
    "SELECT * FROM glob('/etc/*')":
        'Permission Error: Cannot access file "/etc/*" - file system operations are disabled by configuration',
    "INSTALL httpfs": "Permission Error: Cannot access directory ",
    "LOAD httpfs": "Permission Error: Loading external extensions is disabled through configuration",
}
LOCKED = ("enable_external_access", "lock_configuration", "python_enable_replacements", "allowed_directories",
          "memory_limit", "threads")


def test_the_sandbox_reads_no_files_writes_none_and_loads_nothing(server, admin, upstream, tmp_path):
    registry = server.service.home / "registry.db"
    assert registry.exists()
    target = tmp_path / "x.csv"
    cases = dict(SANDBOX)
    cases[f"ATTACH '{registry}' AS r"] = (f'Permission Error: Cannot access file "{registry}" - file system operations '
                                          f'are disabled by configuration')
    cases[f"COPY (SELECT 1) TO '{target}'"] = (f'Permission Error: Cannot access file "{target}" - file system '
                                               f'operations are disabled by configuration')
    cases[f"EXPORT DATABASE '{tmp_path / 'exported'}'"] = "Permission Error: Cannot access directory "
    for option, value in zip(LOCKED, ("true", "false", "true", "['/']", "'100GB'", "8")):
        cases[f"SET {option} = {value}"] = (f'Invalid Input Error: Cannot change configuration option ""{option}"" - '
                                            f'the configuration has been locked')
    cases["RESET enable_external_access"] = ('Invalid Input Error: Cannot change configuration option '
                                             '""enable_external_access"" - the configuration has been locked')
    for statement, message in cases.items():
        body = execute(admin, statement)
        assert body["status"]["state"] == "FAILED", (statement, body)
        error = body["status"]["error"]
        assert error["error_code"] == "SQL_ERROR", (statement, error)
        assert error["message"].startswith(message), (statement, error["message"])
        assert "result" not in body and "manifest" not in body
        assert "root:" not in str(body)  # nothing of /etc/passwd came back
        assert str(Path.home()) not in error["message"]  # nor where the server keeps its files
    assert not target.exists() and not (tmp_path / "exported").exists()
    assert upstream.calls == []

    # what a statement sees of its own settings: replacement scans off, external access off
    settings = execute(admin, "SELECT current_setting('python_enable_replacements') AS p, "
                              "current_setting('enable_external_access') AS e, current_setting('lock_configuration') AS l, "
                              "current_setting('temp_directory') AS t, current_setting('allow_persistent_secrets') AS s, "
                              "current_setting('threads') AS n")
    # no spilling to the server's disk, no secrets from ~/.duckdb, one thread
    assert settings["result"]["data_array"] == [["false", "false", "true", "", "false", "1"]]
    no_getenv = execute(admin, "SELECT getenv('HOME')")["status"]["error"]  # the CLI shell's function, not here
    assert no_getenv["message"].startswith("Catalog Error: Scalar Function with name getenv does not exist!")
    # a name the server has in Python (statements.KEEP_SECONDS) is no table here
    missing = execute(admin, "SELECT * FROM KEEP_SECONDS")["status"]["error"]
    assert missing["error_code"] == "SQL_ERROR"
    assert missing["message"].startswith("Catalog Error: Table with name KEEP_SECONDS does not exist!")


def test_replacement_scans_cannot_reach_python_objects_in_the_calling_frames(echo_client):
    """In process: a DataFrame in the frame that runs the statement is not readable by name (it
    would be with DuckDB's default, python_enable_replacements on)."""
    import duckdb
    import pandas

    from connectors.sql_session import sandboxed

    server_secret = pandas.DataFrame({"secret": ["sk-live-123"]})
    assert duckdb.connect().sql("SELECT * FROM server_secret").fetchall() == [("sk-live-123",)]  # the default
    con, _ = sandboxed(in_process_client(echo_client))
    try:
        assert con.sql("SELECT current_setting('python_enable_replacements')").fetchall() == [(False,)]
        with pytest.raises(duckdb.CatalogException, match="Table with name server_secret does not exist"):
            con.sql("SELECT * FROM server_secret").fetchall()
        assert con.sql("SELECT ai_query('echo', 'hi')").fetchall() == [("hi",)]  # the functions are there
    finally:
        con.close()
    del server_secret


def test_every_endpoint_a_statement_calls_needs_can_query_first(server, admin, upstream, endpoint_id):
    statement = f"SELECT ai_query('{EXTERNAL}', 'say ' || i::VARCHAR) AS a FROM range(2) t(i) ORDER BY i"
    with user(server, "bob") as bob:
        refused = execute(bob, statement)
        assert refused["status"] == {"state": "FAILED", "error": {
            "error_code": "PERMISSION_DENIED",
            "message": f"user 'bob' needs CAN_QUERY on endpoint '{EXTERNAL}' (has no permission); ask someone "
                       f"with CAN_MANAGE to grant it"}}
        assert refused["sqlinfer_progress"]["requests"] == 0
        explained = bob.post(EXPLAIN, json={"statement": statement})
        assert explained.status_code == 403 and explained.json()["error_code"] == "PERMISSION_DENIED", explained.text
        assert EXTERNAL in explained.json()["message"]
        assert upstream.calls == []  # nothing was sent for bob
        assert server.app.state.usage.rows(EXTERNAL) == []

        grant(admin, endpoint_id, "bob", "CAN_VIEW")  # seeing an endpoint is not querying it
        assert execute(bob, statement)["status"]["error"]["error_code"] == "PERMISSION_DENIED"
        assert upstream.calls == []

        grant(admin, endpoint_id, "bob", "CAN_QUERY")
        allowed = execute(bob, statement)
        assert allowed["status"] == {"state": "SUCCEEDED"}, allowed
        assert allowed["result"]["data_array"] == [["say 0"], ["say 1"]]
        assert [r["requester"] for r in server.app.state.usage.rows(EXTERNAL)] == ["bob", "bob"]
        assert bob.post(EXPLAIN, json={"statement": statement}).status_code == 200


def test_a_statement_is_visible_only_to_whoever_started_it(server, admin, upstream, endpoint_id):
    mine = execute(admin, "SELECT 1")
    with user(server, "eve") as eve:
        for response in (eve.get(f"{STATEMENTS}/{mine['statement_id']}"),
                         eve.post(f"{STATEMENTS}/{mine['statement_id']}/cancel")):
            assert response.status_code == 404, response.text
            assert response.json() == {
                "error_code": "RESOURCE_DOES_NOT_EXIST",
                "message": f"no statement {mine['statement_id']!r} of yours; statements are kept for 60 minutes "
                           f"after they finish"}
        never = eve.get(f"{STATEMENTS}/no-such-id")  # the same answer as for a statement that exists
        assert never.status_code == 404 and never.json()["error_code"] == "RESOURCE_DOES_NOT_EXIST"
    assert admin.get(f"{STATEMENTS}/{mine['statement_id']}").json()["status"] == {"state": "SUCCEEDED"}


def test_cancel_stops_a_running_statement(server, admin, upstream, endpoint_id):
    upstream.latency = 2.0  # every answer takes 2 s
    started = admin.post(STATEMENTS, json={
        "statement": f"SELECT ai_query('{EXTERNAL}', 'slow ' || i::VARCHAR) FROM range(3) t(i)", "wait_timeout": "0s"})
    assert started.status_code == 200, started.text
    statement_id = started.json()["statement_id"]
    deadline = time.monotonic() + 20
    while not upstream.calls:  # a request is at the provider: the statement is RUNNING, inside the UDF
        assert time.monotonic() < deadline
        time.sleep(0.01)
    cancel = admin.post(f"{STATEMENTS}/{statement_id}/cancel")
    assert cancel.status_code == 200 and cancel.json() == {}
    assert server.app.state.statements._by_id[statement_id].done.wait(20)  # the run itself has ended
    body = admin.get(f"{STATEMENTS}/{statement_id}").json()
    assert body["status"] == {"state": "CANCELED"}, body
    assert "result" not in body and "manifest" not in body
    upstream.latency = 0.0
    # canceling a finished statement changes nothing
    done = execute(admin, "SELECT 1")
    assert admin.post(f"{STATEMENTS}/{done['statement_id']}/cancel").status_code == 200
    assert admin.get(f"{STATEMENTS}/{done['statement_id']}").json()["status"] == {"state": "SUCCEEDED"}


def test_cancel_sends_nothing_more_of_the_batch_in_hand(server, admin, upstream, endpoint_id):
    """DuckDB hands a UDF up to 2048 rows at once and notices an interrupt only when it returns: the
    cancel must also reach the provider backend, or every row of the chunk is still sent (and paid)."""
    upstream.latency = 1.0
    rows = 4 * PROVIDER_CONCURRENCY  # four waves of the provider's requests at a time
    started = admin.post(STATEMENTS, json={
        "statement": f"SELECT ai_query('{EXTERNAL}', 'row ' || i::VARCHAR) FROM range({rows}) t(i)", "wait_timeout": "0s"})
    statement_id = started.json()["statement_id"]
    deadline = time.monotonic() + 20
    while not upstream.calls:  # the first wave is at the provider: the statement is inside the UDF
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert admin.post(f"{STATEMENTS}/{statement_id}/cancel").status_code == 200
    assert server.app.state.statements._by_id[statement_id].done.wait(20)  # the run itself has ended
    assert admin.get(f"{STATEMENTS}/{statement_id}").json()["status"] == {"state": "CANCELED"}
    assert len(upstream.calls) <= PROVIDER_CONCURRENCY, f"{len(upstream.calls)} of {rows} requests sent after the cancel"


def test_on_wait_timeout_cancel_cancels_what_is_still_running(server, admin, upstream, endpoint_id):
    upstream.latency = 6.0  # longer than the 5 s wait
    body = execute(admin, f"SELECT ai_query('{EXTERNAL}', 'slow')", wait_timeout="5s", on_wait_timeout="CANCEL")
    assert body["status"] == {"state": "CANCELED"}, body


def in_process_client(echo_client):
    from connectors.sql_session import CallerClient

    return CallerClient(echo_client, lambda name: None, lambda: {"echo"}, lambda: None)


def test_a_terminal_state_is_final(echo_client, monkeypatch):
    """In process: a cancel that arrives as the result is collected leaves the statement CANCELED
    (a client that saw CANCELED must never see it turn SUCCEEDED), and a cancel after the end
    changes nothing."""
    from connectors import sql_session
    from connectors.sql_session import Statement

    late = Statement(statement_id="late", owner="me", text="SELECT ai_query('echo', 'hi') AS a", row_limit=10)
    collect = sql_session._collect

    def collected_then_canceled(relation, row_limit, canceled=None):
        result = collect(relation, row_limit)  # the whole result, as if the cancel came just after
        late.cancel()
        return result

    monkeypatch.setattr(sql_session, "_collect", collected_then_canceled)
    late.run(in_process_client(echo_client))
    assert (late.state, late.result, late.error, late.done.is_set()) == ("CANCELED", None, None, True)
    monkeypatch.setattr(sql_session, "_collect", collect)

    finished = Statement(statement_id="finished", owner="me", text="SELECT 1 AS one", row_limit=10)
    finished.run(in_process_client(echo_client))
    finished.cancel()
    assert finished.state == "SUCCEEDED" and finished.result.rows == [["1"]] and not finished.canceled.is_set()


def test_a_bug_while_running_still_ends_the_statement(echo_client, monkeypatch):
    """In process: ``run`` never raises and always ends; an unexpected error is FAILED with
    INTERNAL_ERROR (the details go to the server log, not to the caller), never a state that
    a polling client waits on forever."""
    from connectors import sql_session
    from connectors.sql_session import Statement

    def broken(relation, row_limit, canceled=None):
        raise RuntimeError("a bug in sqlinfer at /srv/secret/path")

    monkeypatch.setattr(sql_session, "_collect", broken)
    statement = Statement(statement_id="s", owner="me", text="SELECT 1", row_limit=10)
    statement.run(in_process_client(echo_client))
    assert statement.state == "FAILED" and statement.done.is_set()
    assert statement.error.to_dict() == {"error_code": "INTERNAL_ERROR",
                                         "message": "internal error in sqlinfer; the server log has the details"}


@pytest.mark.parametrize("fields, name, message", [
    ({"wait_timeout": "3s"}, "wait_timeout", "wait_timeout: '3s' is not allowed; use '0s' (answer at once) or '5s' to '50s'"),
    ({"wait_timeout": "60s"}, "wait_timeout", "wait_timeout: '60s' is not allowed; use '0s' (answer at once) or '5s' to '50s'"),
    ({"wait_timeout": "10"}, "wait_timeout", "wait_timeout: '10' is not allowed; use '0s' (answer at once) or '5s' to '50s'"),
    ({"row_limit": 0}, "row_limit", None),
    ({"row_limit": 10_001}, "row_limit", None),
    ({"disposition": "EXTERNAL_LINKS"}, "disposition", None),
    ({"no_such_field": 1}, "no_such_field", None),
])
def test_parameters_out_of_range_are_refused_by_name(server, admin, fields, name, message):
    response = admin.post(STATEMENTS, json={"statement": "SELECT 1", **fields})
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error_code"] == "INVALID_PARAMETER_VALUE" and body["message"].startswith(f"{name}: "), body
    if message is not None:
        assert body["message"] == message
    assert server.app.state.statements._by_id == {}  # nothing was started


def test_a_user_has_at_most_so_many_statements_running(server, admin, upstream, endpoint_id, monkeypatch):
    monkeypatch.setenv("SQLINFER_SQL_STATEMENTS_PER_USER", "1")
    upstream.latency = 2.0
    first = admin.post(STATEMENTS, json={"statement": f"SELECT ai_query('{EXTERNAL}', 'slow')", "wait_timeout": "0s"})
    assert first.status_code == 200, first.text
    second = admin.post(STATEMENTS, json={"statement": "SELECT 1", "wait_timeout": "0s"})
    assert second.status_code == 429, second.text
    assert second.headers["Retry-After"] == "5"
    assert second.json() == {"error_code": "RESOURCE_EXHAUSTED",
                             "message": "user 'admin@example.com' has 1 statements or EXPLAINs running, the most "
                                        "allowed (SQLINFER_SQL_STATEMENTS_PER_USER); wait for one or cancel it"}
    with user(server, "carol") as carol:  # the limit is per user
        assert execute(carol, "SELECT 1")["status"] == {"state": "SUCCEEDED"}
    assert settled(admin, first.json()["statement_id"])["status"] == {"state": "SUCCEEDED"}
    assert execute(admin, "SELECT 1")["status"] == {"state": "SUCCEEDED"}  # room again once it finished


def test_row_limit_truncates_the_rows_sent_not_the_count(server, admin):
    body = execute(admin, "SELECT i FROM range(5) t(i) ORDER BY i", row_limit=2)
    assert body["result"]["data_array"] == [["0"], ["1"]] and body["result"]["row_count"] == 2
    assert body["manifest"]["truncated"] is True and body["manifest"]["total_row_count"] == 5
    exact = execute(admin, "SELECT i FROM range(5) t(i) ORDER BY i", row_limit=5)
    assert exact["manifest"]["truncated"] is False and len(exact["result"]["data_array"]) == 5


def test_explain_counts_the_calls_without_calling_the_model(server, admin, upstream, endpoint_id):
    response = admin.post(EXPLAIN, json={"statement": f"SELECT ai_query('{EXTERNAL}', 'row ' || i::VARCHAR) FROM range(4) t(i)"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["calls"]) == 1
    call = body["calls"][0]
    assert (call["function"], call["endpoint"], call["rows"], call["distinct_requests"], call["cache_hits"],
            call["to_send"]) == ("ai_query", EXTERNAL, 4, 4, 0, 4), call
    assert body["totals"]["rows"] == 4 and body["totals"]["to_send"] == 4
    assert upstream.calls == []
    assert server.app.state.usage.rows(EXTERNAL) == []
    bad = admin.post(EXPLAIN, json={"statement": "SELECT * FROM nowhere"})
    assert bad.status_code == 400 and bad.json()["error_code"] == "SQL_ERROR", bad.text
    assert admin.post(EXPLAIN, json={"statement": "SELECT 1", "extra": 1}).status_code == 400


def test_shared_tables_come_from_the_operators_folder(server, admin, tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "people.csv").write_text("name,age\nada,36\ngrace,45\nalan,41\n")
    (shared / "notes.txt").write_text("not a table\n")
    monkeypatch.setenv("SQLINFER_SQL_DATA", str(shared))
    body = execute(admin, "SELECT count(*) AS n FROM people")
    assert body["status"] == {"state": "SUCCEEDED"}, body
    assert body["result"]["data_array"] == [["3"]]
    oldest = execute(admin, "SELECT name, age FROM people ORDER BY age DESC LIMIT 1")
    assert oldest["result"]["data_array"] == [["grace", "45"]]
    assert [c["type_text"] for c in oldest["manifest"]["schema"]["columns"]] == ["VARCHAR", "BIGINT"]
    # the shared files are readable (allowed_paths), and nothing else of the folder
    direct = execute(admin, f"SELECT count(*) FROM read_csv('{shared / 'people.csv'}')")
    assert direct["result"]["data_array"] == [["3"]], direct
    neighbour = execute(admin, f"SELECT * FROM read_csv('{shared / 'notes.txt'}')")
    assert neighbour["status"]["error"]["error_code"] == "SQL_ERROR"
    assert "Permission Error" in neighbour["status"]["error"]["message"]
    assert execute(admin, "SELECT * FROM notes")["status"]["error"]["message"].startswith(
        "Catalog Error: Table with name notes does not exist!")


def test_a_shared_file_that_cannot_be_read_fails_the_statement_by_name(server, admin, tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "broken.parquet").write_bytes(b"this is not parquet")
    monkeypatch.setenv("SQLINFER_SQL_DATA", str(shared))
    response = admin.post(STATEMENTS, json={"statement": "SELECT 1", "wait_timeout": "0s"})
    body = settled(admin, response.json()["statement_id"], timeout=10)
    assert body["status"]["state"] == "FAILED", body
    assert body["status"]["error"]["error_code"] == "SQL_ERROR"
    assert body["status"]["error"]["message"].startswith(
        "the shared table 'broken' (broken.parquet in SQLINFER_SQL_DATA) cannot be read: "), body
    assert str(shared) not in body["status"]["error"]["message"]  # the server's folder is not the caller's business
    explained = admin.post(EXPLAIN, json={"statement": "SELECT 1"})
    assert explained.status_code == 400 and explained.json()["error_code"] == "SQL_ERROR", explained.text
    assert "broken.parquet" in explained.json()["message"]


def test_a_result_keeps_at_most_so_many_bytes_and_counts_the_rest(server, admin, monkeypatch):
    monkeypatch.setenv("SQLINFER_SQL_RESULT_BYTES", "1000")
    body = execute(admin, "SELECT repeat('x', 100) AS x FROM range(50)")
    assert body["status"] == {"state": "SUCCEEDED"}, body
    assert body["result"]["row_count"] == 10  # 10 x 100 characters fit in 1000; the 11th does not
    assert body["manifest"]["total_row_count"] == 50 and body["manifest"]["truncated"] is True


def test_a_statement_that_runs_too_long_fails_with_statement_timeout(server, admin, upstream, endpoint_id, monkeypatch):
    monkeypatch.setenv("SQLINFER_SQL_TIMEOUT_SECONDS", "1")
    upstream.latency = 4.0
    started = admin.post(STATEMENTS, json={"statement": f"SELECT ai_query('{EXTERNAL}', 'slow')", "wait_timeout": "0s"})
    statement_id = started.json()["statement_id"]
    assert server.app.state.statements._by_id[statement_id].done.wait(20)
    body = admin.get(f"{STATEMENTS}/{statement_id}").json()
    assert body["status"] == {"state": "FAILED", "error": {
        "error_code": "STATEMENT_TIMEOUT",
        "message": "the statement ran past 1 s (SQLINFER_SQL_TIMEOUT_SECONDS) and was stopped; filter the rows, "
                   "or run it with sqlinfer sql on your machine"}}, body


def test_the_server_runs_at_most_so_many_statements_of_all_users(server, admin, upstream, endpoint_id, monkeypatch):
    monkeypatch.setenv("SQLINFER_SQL_STATEMENTS", "1")
    upstream.latency = 2.0
    first = admin.post(STATEMENTS, json={"statement": f"SELECT ai_query('{EXTERNAL}', 'slow')", "wait_timeout": "0s"})
    assert first.status_code == 200, first.text
    with user(server, "carol") as carol:
        refused = carol.post(STATEMENTS, json={"statement": "SELECT 1"})
        assert refused.status_code == 429, refused.text
        assert refused.json()["message"] == ("the server is running 1 statements, the most it runs at once "
                                             "(SQLINFER_SQL_STATEMENTS); try again shortly")
        explain = carol.post(EXPLAIN, json={"statement": "SELECT 1"})  # an EXPLAIN is work too
        assert explain.status_code == 429, explain.text
    assert settled(admin, first.json()["statement_id"])["status"] == {"state": "SUCCEEDED"}


def test_an_error_inside_a_function_that_is_not_the_callers_is_logged_not_echoed(server, admin):
    """Calling an internal function with garbage reaches code that trusts its caller: the answer is
    INTERNAL_ERROR with the generic message (the details go to the server log only)."""
    body = execute(admin, "SELECT __sqlinfer_ai_task('ai_gen', NULL, 'x', '{}')")
    error = body["status"]["error"]
    assert error == {"error_code": "INTERNAL_ERROR", "message": "internal error in sqlinfer; the server log has the details"}, body


def test_answers_are_kept_per_caller(server, admin, upstream, endpoint_id, monkeypatch):
    """A re-run of one's own statement pays nothing twice; another user's identical statement is
    sent again, so nobody learns from a cache hit that someone else asked the same thing."""
    monkeypatch.setenv("SQLINFER_RESULT_STORE", "on")  # in this session's SQLINFER_HOME; the prompt is this test's own
    query = f"SELECT ai_query('{EXTERNAL}', 'kept per caller {time.time()}', modelParameters => {{'temperature': 0.0}}) AS a"
    first = execute(admin, query)
    answer = [[query.split("'")[3]]]  # the provider echoes the prompt
    assert first.get("result", {}).get("data_array") == answer and len(upstream.calls) == 1, first
    again = execute(admin, query)
    assert again["result"]["data_array"] == answer and len(upstream.calls) == 1  # from the store
    with user(server, "carol") as carol:
        grant(admin, endpoint_id, "carol", "CAN_QUERY")
        assert admin.post(EXPLAIN, json={"statement": query}).json()["calls"][0]["cache_hits"] == 1  # admin's own
        plan = carol.post(EXPLAIN, json={"statement": query}).json()
        assert plan["calls"][0]["cache_hits"] == 0  # admin's answer is not carol's
        theirs = execute(carol, query)
        assert theirs["result"]["data_array"] == answer
        assert theirs["sqlinfer_progress"]["requests"] == 1 and len(upstream.calls) == 2


def test_a_statement_cancelled_before_it_starts_still_ends_and_frees_its_slot(echo_client):
    from connectors.sql_session import Statement

    statement = Statement(statement_id="early", owner="someone", text="SELECT 1", row_limit=10)
    statement.cancel()
    statement.run(in_process_client(echo_client))
    assert statement.done.is_set() and statement.finished is not None  # counted as finished: its slot is free
    assert (statement.state, statement.result, statement.error) == ("CANCELED", None, None)


def test_a_cancel_that_lands_between_queries_still_stops_the_reader(echo_client, monkeypatch):
    """DuckDB forgets an interrupt that arrives before the reader starts; the cancel event does not."""
    from connectors import sql_session
    from connectors.sql_session import Statement

    statement = Statement(statement_id="between", owner="someone", text="SELECT * FROM range(100000)", row_limit=10)
    collect = sql_session._collect

    def cancel_first(relation, row_limit, canceled=None):
        statement.cancel()  # lands after con.sql() and before the first batch is read
        return collect(relation, row_limit, canceled)

    monkeypatch.setattr(sql_session, "_collect", cancel_first)
    statement.run(in_process_client(echo_client))
    assert statement.done.is_set()
    assert (statement.state, statement.result) == ("CANCELED", None)
