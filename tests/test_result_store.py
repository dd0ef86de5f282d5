"""The durable result store: a killed query resumes without paying twice; deterministic answers
are reused; config updates, TTL and `sqlinfer cache clear` invalidate; duplicates across chunks
are sent once. The provider is a real HTTP server on 127.0.0.1 that records every request."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from tests.registry_helpers import SQLINFER, external_endpoint

ROWS = 40


@pytest.fixture
def home(tmp_path, monkeypatch, upstream):
    from serving.control.service import EndpointService

    home = tmp_path / "home"
    monkeypatch.setenv("SQLINFER_HOME", str(home))
    monkeypatch.setenv("SQLINFER_RESULT_STORE", "on")
    service = EndpointService(home)
    service.create(external_endpoint("slow", upstream.url))
    service.wait_for_deployments()
    return home


def asked(upstream) -> list[str]:
    return [body["messages"][-1]["content"] for path, body, _ in upstream.calls if path.endswith("/chat/completions")]


QUERY_SCRIPT = textwrap.dedent("""
    import sys
    from connectors.duckdb import connect
    con = connect()
    con.execute("SET enable_progress_bar = false")
    rows = con.execute("SELECT i, ai_query('slow', 'question ' || i) FROM range({rows}) t(i) ORDER BY i").fetchall()
    print(sum(1 for i, answer in rows if answer == f"question {{i}}"))
""")


def run_query(home, rows: int = ROWS, **extra_env) -> subprocess.Popen:
    env = os.environ | {"SQLINFER_HOME": str(home), "SQLINFER_RESULT_STORE": "on", "SQLINFER_PROVIDER_CONCURRENCY": "2",
                        **extra_env}
    return subprocess.Popen([sys.executable, "-c", QUERY_SCRIPT.format(rows=rows)], env=env, stdout=subprocess.PIPE, text=True)


def stored(home) -> set[str]:
    path = home / "results.db"
    if not path.exists():
        return set()
    with sqlite3.connect(path) as con:
        try:
            return {row[0] for row in con.execute("SELECT result_json FROM results")}
        except sqlite3.OperationalError:  # the table is being created
            return set()


def test_a_query_killed_mid_run_resumes_without_paying_twice(home, upstream):
    upstream.latency = 0.1
    first = run_query(home)
    deadline = time.monotonic() + 120
    while len(stored(home)) < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    kept = len(stored(home))
    answered_before = set(asked(upstream))
    assert 10 <= kept < ROWS

    upstream.calls.clear()
    second = run_query(home)
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 0 and out.strip() == str(ROWS)  # every row answered, correctly
    asked_again = asked(upstream)
    assert len(asked_again) == ROWS - kept  # only the rows whose answers were not kept
    assert len(set(asked_again)) == len(asked_again)
    # nothing whose answer had come back was asked again; at most the few in flight at the kill were
    assert len(answered_before & set(asked_again)) <= 2
    assert set(asked_again) | answered_before == {f"question {i}" for i in range(ROWS)}


def test_deterministic_answers_are_reused_and_random_ones_are_not(home, upstream):
    from connectors.duckdb import connect

    con = connect()
    try:
        def ask(parameters: str) -> None:
            con.execute(f"SELECT ai_query('slow', q, modelParameters => {parameters}) FROM (VALUES ('a'), ('b')) t(q)").fetchall()

        ask("{'max_tokens': 5}")  # temperature 0 by default
        ask("{'max_tokens': 5}")
        assert len(asked(upstream)) == 2
        snapshot = __import__("connectors.duckdb", fromlist=["functions"]).functions(con).stats.snapshot()
        assert snapshot.cache_hits == 2
        ask("{'max_tokens': 5, 'temperature': 0.8}")
        ask("{'max_tokens': 5, 'temperature': 0.8}")
        assert len(asked(upstream)) == 6  # sampled requests are answered afresh
        ask("{'max_tokens': 5, 'temperature': 0.8, 'seed': 7}")
        ask("{'max_tokens': 5, 'temperature': 0.8, 'seed': 7}")
        assert len(asked(upstream)) == 8  # a seed makes them reproducible: stored
        functions = __import__("connectors.duckdb", fromlist=["functions"]).functions
        functions(con).store = None  # off for this connection
        ask("{'max_tokens': 5}")
        assert len(asked(upstream)) == 10
    finally:
        con.close()


def test_a_config_update_ttl_and_cache_clear_invalidate(home, upstream, monkeypatch):
    from connectors.duckdb import connect
    from serving.control.service import EndpointService

    def ask() -> None:
        con = connect()
        try:
            con.execute("SELECT ai_query('slow', 'same question')").fetchall()
        finally:
            con.close()

    ask()
    ask()
    assert len(asked(upstream)) == 1
    service = EndpointService(home)
    config = external_endpoint("slow", upstream.url)["config"]
    config["served_entities"][0]["external_model"]["name"] = "model-y"
    service.update_config("slow", config)
    service.wait_for_deployments()
    ask()
    assert len(asked(upstream)) == 2  # a new config version: the old model's answer is not reused

    cleared = subprocess.run([SQLINFER, "cache", "clear", "--endpoint", "slow"], capture_output=True, text=True,
                             env=os.environ | {"SQLINFER_HOME": str(home)})
    assert cleared.returncode == 0 and "removed 2 stored answers of 'slow'" in cleared.stdout
    ask()
    assert len(asked(upstream)) == 3

    monkeypatch.setenv("SQLINFER_RESULT_TTL", "0.3")
    from serving.data import result_store

    result_store._STORES.clear()
    time.sleep(0.5)
    ask()
    assert len(asked(upstream)) == 4  # older than the TTL: asked again


def test_identical_requests_across_chunks_are_sent_once(home, upstream):
    from connectors.duckdb import connect

    con = connect()
    try:
        rows = con.execute("SELECT i, ai_query('slow', 'q' || (i % 50)) FROM range(6000) t(i) ORDER BY i").fetchall()
    finally:
        con.close()
    assert [answer for _, answer in rows] == [f"q{i % 50}" for i in range(6000)]
    assert sorted(asked(upstream)) == sorted(f"q{i}" for i in range(50))  # 3 chunks, each value once
