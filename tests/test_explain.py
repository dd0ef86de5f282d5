"""EXPLAIN and budgets: estimates without calling a model, right within 10% on tokens for the
bundled models; budgets stop a query before spending and while it runs."""

from __future__ import annotations

import pytest

from ai_functions.explain import Budget, BudgetExceeded, totals
from connectors.duckdb import connect, execute_within, explain, functions
from serving.data.backends import EchoBackend
from tests.conftest import CHAT_ENDPOINT, EMBED_ENDPOINT
from tests.registry_helpers import duckdb_on, external_endpoint

REVIEWS = "read_csv('examples/data/reviews.csv', allow_quoted_nulls=false)"


@pytest.fixture
def echo():
    backend = EchoBackend()
    with duckdb_on("echo", backend) as con:
        yield con, backend


@pytest.mark.engine
def test_explain_counts_tokens_with_the_models_tokenizer_and_calls_nothing(chat_engine, embed_engine):
    con = connect()
    try:
        query = (f"SELECT ai_query('{CHAT_ENDPOINT}', 'Is this review positive? ' || review, modelParameters => {{'max_tokens': 8}}), "
                 f"ai_embed('{EMBED_ENDPOINT}', review) FROM {REVIEWS} LIMIT 40")
        before = chat_engine.peak_in_flight, functions(con).stats.snapshot().requests
        estimates = {e.function: e for e in explain(con, query)}
        assert functions(con).stats.snapshot().requests == before[1] == 0  # nothing was sent
        con.execute(query).fetchall()
        spent = functions(con).stats.snapshot()
    finally:
        con.close()
    chat, embed = estimates["ai_query"], estimates["ai_embed"]
    assert chat.tokens_exact and embed.tokens_exact
    assert chat.rows == 40 and chat.to_send == chat.distinct_requests
    actual_input = spent.tokens_by_endpoint[CHAT_ENDPOINT][0]
    assert abs(chat.input_tokens - actual_input) <= 0.1 * actual_input
    assert abs(embed.input_tokens - spent.tokens_by_endpoint[EMBED_ENDPOINT][0]) <= 0.1 * embed.input_tokens
    assert spent.tokens_by_endpoint[CHAT_ENDPOINT][1] <= chat.output_tokens == 8 * chat.to_send


def test_a_query_over_budget_fails_before_any_call(echo):
    con, backend = echo
    functions(con).stats.set_price("echo", 1.0, 2.0)
    with pytest.raises(BudgetExceeded, match=r"before running \(estimate\): estimated cost .* exceeds max_cost = 1e-06"):
        execute_within(con, "SELECT ai_query('echo', 'some words ' || i) FROM range(100) t(i)", Budget(max_cost=0.000001))
    with pytest.raises(BudgetExceeded, match=r"tokens exceed max_tokens = 10"):
        execute_within(con, "SELECT ai_query('echo', 'some words ' || i) FROM range(100) t(i)", Budget(max_tokens=10))
    assert backend.calls == []
    table = execute_within(con, "SELECT ai_query('echo', 'hi', modelParameters => {'max_tokens': 4})", Budget(max_cost=1.0))
    assert table.column(0).to_pylist() == ["hi"]


def test_the_budget_holds_while_the_query_runs(echo):
    con, backend = echo
    ai = functions(con)
    ai.budget = Budget(max_tokens=3000)  # set directly: the run itself must stop at the budget
    with pytest.raises(Exception, match=r"while running: .* tokens exceed max_tokens = 3000"):
        con.execute("SELECT ai_query('echo', 'one two three four five ' || i) FROM range(10000) t(i)").fetchall()
    assert 0 < sum(backend.calls) < 10000  # some chunks ran, then it stopped


def test_cache_hits_and_rate_limits_shape_the_estimate(tmp_path, monkeypatch, upstream):
    from serving.control.service import EndpointService

    monkeypatch.setenv("SQLINFER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SQLINFER_RESULT_STORE", "on")
    monkeypatch.setenv("SQLINFER_PRICES", "limited=1/1")
    service = EndpointService(tmp_path / "home")
    service.create(external_endpoint("limited", upstream.url, rate_limits=[{"calls": 60, "key": "endpoint", "renewal_period": "minute"}]))
    service.wait_for_deployments()
    con = connect()
    try:
        query = "SELECT ai_query('limited', 'question ' || (i % 120), modelParameters => {'max_tokens': 10}) FROM range(240) t(i)"
        [first] = explain(con, query)
        assert (first.rows, first.distinct_requests, first.cache_hits, first.to_send) == (240, 120, 0, 120)
        assert not first.tokens_exact  # an external model's tokenizer is not here: ~4 characters a token
        assert first.seconds == pytest.approx(120.0) and "60 calls/minute" in first.limited_by
        con.execute("SELECT ai_query('limited', 'question ' || i, modelParameters => {'max_tokens': 10}) FROM range(30) t(i)").fetchall()
        [second] = explain(con, query)
        assert second.cache_hits == 30 and second.to_send == 90
        assert totals([second])[1] < totals([first])[1]
    finally:
        con.close()
    assert len(upstream.calls) == 30  # explain itself sent nothing
