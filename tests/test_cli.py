"""The ``sqlinfer`` command, run as a user runs it: a subprocess of the installed console script."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.registry_helpers import SQLINFER
from tests.conftest import CHAT_ENDPOINT



def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([SQLINFER, *args], capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


def test_models_lists_the_bundled_models():
    result = run("models")
    assert result.returncode == 0, result.stderr
    assert "smollm2-135m-instruct" in result.stdout and "all-minilm-l6-v2" in result.stdout
    assert "llm/v1/embeddings" in result.stdout


def test_endpoints_lists_the_system_endpoints():
    result = run("endpoints", "list")
    assert result.returncode == 0, result.stderr
    assert CHAT_ENDPOINT in result.stdout and "system-all-minilm-l6-v2" in result.stdout


def test_sql_error_is_one_clear_line_and_exit_status_1():
    result = run("sql", "SELECT ai_query('no-such-endpoint', 'hi')", "--no-progress")
    assert result.returncode == 1
    assert "error: " in result.stderr and "endpoint 'no-such-endpoint' does not exist; known endpoints:" in result.stderr
    assert "Traceback" not in result.stderr


def test_sql_reads_csv_files_without_models(tmp_path):
    csv = tmp_path / "items.csv"
    csv.write_text("id,name\n1,apple\n2,pear\n")
    result = run("sql", f"SELECT count(*) AS n, max(name) AS last FROM '{csv}'", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "pear" in result.stdout and "2" in result.stdout


@pytest.mark.slow
@pytest.mark.engine
def test_sql_runs_ai_query_on_the_local_model(tmp_path):
    csv = tmp_path / "questions.csv"
    csv.write_text("question\nWhat is the capital of France? Answer in one word.\n")
    query = f"SELECT ai_query('{CHAT_ENDPOINT}', question, modelParameters => {{'max_tokens': 8}}) AS answer FROM '{csv}'"
    result = run("sql", query)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "ai functions: 1 rows" in result.stderr  # summary on stderr, table on stdout
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr


def test_an_unreachable_server_fails_at_once_naming_the_url(capsys):
    from connectors.cli import main
    from tests.rest_server import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert main(["sql", "--server", url, "--no-progress", "SELECT 1"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: TEMPORARILY_UNAVAILABLE: cannot reach sqlinfer serve at {url} (ConnectError")
    assert "check the --server / SQLINFER_SERVER URL" in error


def test_registering_the_functions_starts_no_engine():
    # A fresh process: connect() registers ai_query/ai_embed (learning ai_embed's FLOAT[n] from the
    # model's files) and runs a query on the instant echo endpoint; no local engine may start.
    import json
    import sys

    code = ("import json; from connectors.duckdb import connect; from engine.vllm_engine import engine_states;"
            "con = connect(); print(con.sql(\"SELECT typeof(ai_embed('system-all-minilm-l6-v2', NULL)) AS t, "
            "ai_query('system-echo', 'hi') AS a\").fetchall()); print(json.dumps(engine_states()))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    typed, states = result.stdout.strip().splitlines()
    assert typed == "[('FLOAT[384]', 'hi')]"
    assert json.loads(states) == {}


SERVER_QUERIES = [
    # plain text with a duplicate, a NULL and a row the engine refuses (longer than max_model_len)
    f"SELECT id, ai_query('{CHAT_ENDPOINT}', q, failOnError => false, modelParameters => {{'max_tokens': 8}}) AS r "
    f"FROM (VALUES (1, 'What is the capital of France? Answer in one word.'), (2, NULL), (3, repeat('word ', 3000)), "
    f"(4, 'Name a colour.'), (5, 'What is the capital of France? Answer in one word.')) t(id, q) ORDER BY id",
    # a typed answer held to its shape by structured output
    f"SELECT ai_query('{CHAT_ENDPOINT}', 'Give the city and country of the Eiffel Tower.', "
    f"returnType => 'STRUCT<city: STRING, country: STRING>', modelParameters => {{'max_tokens': 40}}) AS place",
]


def _summary_counts(stderr: str) -> str:
    """The summary line without its timings (rows/s and wall seconds differ run to run)."""
    [line] = [l for l in stderr.splitlines() if l.startswith("ai functions: ")]
    return line.rsplit(", ", 2)[0]


@pytest.mark.engine
@pytest.mark.slow  # about 3 minutes on 2 cores: in `make test-slow`, which CI runs too
@pytest.mark.parametrize("query", SERVER_QUERIES)
def test_sql_through_a_warm_server_answers_as_in_process(query, chat_engine, sqlinfer_server, capsys, monkeypatch):
    from connectors.cli import main

    url, token = sqlinfer_server
    monkeypatch.delenv("SQLINFER_SERVER", raising=False)
    chat_engine.reset_prefix_cache()  # both engines compute every prompt the same way (no cached prefixes)
    assert main(["sql", "--format", "jsonl", "--no-progress", query]) == 0
    local = capsys.readouterr()
    monkeypatch.setenv("SQLINFER_TOKEN", token)  # the token as users give it, without --token
    assert main(["sql", "--server", url, "--format", "jsonl", "--no-progress", query]) == 0
    remote = capsys.readouterr()
    assert remote.out == local.out and remote.out.strip()
    assert _summary_counts(remote.err) == _summary_counts(local.err)
    rows = [json.loads(line) for line in remote.out.splitlines()]
    if "failOnError" in query:
        assert [r["id"] for r in rows] == [1, 2, 3, 4, 5]
        assert rows[1]["r"] is None and rows[0]["r"] == rows[4]["r"] and "Paris" in rows[0]["r"]["result"]
        assert rows[2]["r"]["result"] is None and "maximum context length is 2048 tokens" in rows[2]["r"]["errorMessage"]
        assert "5 rows (1 NULL, 0 from the result store, 1 answered by an identical request, 1 errors), 3 requests" in remote.err
    else:
        assert set(rows[0]["place"]) == {"city", "country"}


@pytest.mark.engine
def test_a_query_that_uses_only_ai_query_starts_no_embedding_engine(sqlinfer_server):
    import psutil

    from connectors.duckdb import connect
    from serving.data.http_client import HttpServingClient

    url, token = sqlinfer_server
    con = connect(client=HttpServingClient(url, token))  # registers ai_embed too (FLOAT[384] asked of the server)
    [(answer,)] = con.sql(f"SELECT ai_query('{CHAT_ENDPOINT}', 'Say hi.', modelParameters => {{'max_tokens': 4}})").fetchall()
    assert answer
    server = next(p for p in psutil.process_iter(["cmdline"]) if f"--port" in (p.info["cmdline"] or [])
                  and url.rsplit(":", 1)[1] in p.info["cmdline"])
    engines = [p for p in server.children(recursive=True) if p.name() == "VLLM::EngineCore"]
    assert len(engines) == 1  # the chat engine; the embedding engine was never started
