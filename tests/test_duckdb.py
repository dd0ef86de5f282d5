"""ai_query / ai_embed in DuckDB: semantics on the echo backend, then end to end on the real engine."""

from __future__ import annotations

import json

import duckdb
import pytest

from connectors.duckdb import connect, functions, register
from tests.conftest import CHAT_ENDPOINT, EMBED_ENDPOINT


@pytest.fixture
def echo_con(echo_client):
    con = connect(client=echo_client)
    yield con
    con.close()


def test_connect_registers_both_functions_and_register_works_on_any_connection(echo_client):
    con = duckdb.connect()
    ai = register(con, echo_client)
    assert con.execute("SELECT ai_query('echo', 'hi there')").fetchone() == ("hi there",)
    assert ai.embedding_dimension == 4
    assert con.execute("SELECT typeof(ai_embed('echo-vectors', 'x'))").fetchone() == ("FLOAT[4]",)
    con.close()


def test_nulls_give_nulls_and_empty_strings_are_requests(echo_con):
    rows = echo_con.execute(
        "SELECT ai_query('echo', r) FROM (VALUES ('a b'), (NULL), (''), (NULL)) t(r)"
    ).fetchall()
    assert rows == [("a b",), (None,), ("",), (None,)]
    vectors = echo_con.execute("SELECT ai_embed('echo-vectors', r) FROM (VALUES (NULL), ('x')) t(r)").fetchall()
    assert vectors[0] == (None,) and len(vectors[1][0]) == 4


def test_order_is_kept_across_chunks_and_duplicates_are_sent_once(echo_con, echo_registry):
    rows = echo_con.execute(
        "SELECT i, ai_query('echo', 'row ' || (i % 700)::VARCHAR) AS a FROM range(5000) t(i) ORDER BY i"
    ).fetchall()
    assert [a for _, a in rows] == [f"row {i % 700}" for i in range(5000)]
    calls = echo_registry.backend("echo").calls
    assert len(calls) >= 3, "5000 rows should arrive in several DuckDB chunks"
    assert all(size <= 700 for size in calls), "identical requests of a chunk must be sent once"
    stats = functions(echo_con).stats.snapshot()
    assert stats.rows == 5000 and stats.deduplicated == 5000 - sum(calls)


def test_model_parameters_with_both_named_argument_syntaxes(echo_con):
    arrow = echo_con.execute("SELECT ai_query('echo', 'one two three', modelParameters => {'max_tokens': 2})").fetchone()
    colon = echo_con.execute("SELECT ai_query('echo', 'one two three', modelParameters := {'max_tokens': 1})").fetchone()
    assert arrow == ("one two",) and colon == ("one",)


@pytest.mark.parametrize(
    "parameters, message",
    [
        ("{'temperature': 9}", r"modelParameters.temperature = 9 is invalid"),
        ("{'max_tokens': 0}", r"modelParameters.max_tokens = 0 is invalid"),
        ("{'colour': 'red'}", r"modelParameters.colour is not a supported parameter; supported: max_tokens"),
        ("{'messages': 'x'}", r"modelParameters.messages is reserved"),
        ("{'n': 3}", r"modelParameters.n is reserved: it is set by ai_query \(one answer per row\)"),
        ("{'max_tokens': 'many'}", r"modelParameters.max_tokens = 'many' is invalid"),
    ],
)
def test_invalid_model_parameters_are_refused_before_any_call(echo_con, echo_registry, parameters, message):
    with pytest.raises(duckdb.Error, match=r"AI_FUNCTION_INVALID_MODEL_PARAMETERS.*" + message):
        echo_con.execute(f"SELECT ai_query('echo', 'x', modelParameters => {parameters})").fetchall()
    assert echo_registry.backend("echo").calls == []


def test_unknown_endpoint_names_it_and_lists_the_known_ones(echo_con):
    with pytest.raises(duckdb.Error, match=r"endpoint 'nope' does not exist; known endpoints: echo, echo-vectors"):
        echo_con.execute("SELECT ai_query('nope', 'x')").fetchall()


def test_a_failed_row_fails_the_query_with_its_endpoint_and_request(echo_con):
    with pytest.raises(duckdb.Error, match=r"ai_query failed on endpoint 'echo' for request 'please FAIL now'"):
        echo_con.execute("SELECT ai_query('echo', r) FROM (VALUES ('ok'), ('please FAIL now')) t(r)").fetchall()


def test_ai_query_on_an_embeddings_endpoint_returns_the_vector_and_ai_embed_refuses_chat(echo_con):
    [(vector, text)] = echo_con.execute("SELECT ai_query('echo-vectors', 'x', returnType => 'ARRAY<FLOAT>'), "
                                        "ai_query('echo-vectors', 'x')").fetchall()
    [(embedded,)] = echo_con.execute("SELECT ai_embed('echo-vectors', 'x')").fetchall()
    assert vector == pytest.approx(list(embedded)) and json.loads(text) == pytest.approx(vector)
    with pytest.raises(duckdb.Error, match=r"ai_embed needs an embeddings endpoint, but 'echo' serves llm/v1/chat"):
        echo_con.execute("SELECT ai_embed('echo', 'x')").fetchall()


# -- the real engine, bundled models ------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_con():
    con = connect()
    yield con
    con.close()


@pytest.mark.engine
def test_ai_query_on_the_local_model(engine_con, chat_engine):
    [(answer,)] = engine_con.execute(
        f"SELECT ai_query('{CHAT_ENDPOINT}', 'What is the capital of France? Answer in one word.', "
        f"modelParameters => {{'max_tokens': 8}})"
    ).fetchall()
    assert "Paris" in answer


@pytest.mark.engine
def test_more_than_2048_rows_cross_chunks_in_order(engine_con, chat_engine):
    # 2100 rows over 300 distinct prompts: two DuckDB chunks, each sent to vLLM in one batch.
    # Each prompt's answer repeats its own number, so a row shows whether it got its own answer.
    rows = engine_con.execute(f"""
        SELECT i, ai_query('{CHAT_ENDPOINT}', 'Repeat this number: ' || (1000 + i % 300)::VARCHAR,
                           modelParameters => {{'max_tokens': 5}}) AS answer
        FROM range(2100) t(i) ORDER BY i
    """).fetchall()
    assert len(rows) == 2100
    own = [i for i, answer in rows if str(1000 + i % 300) in answer]
    assert len(own) >= 0.98 * 2100, [rows[i] for i in range(2100) if i not in set(own)][:5]  # shifted rows score ~0


@pytest.mark.engine
def test_nulls_and_empty_strings_on_the_engine(engine_con, chat_engine, embed_engine):
    rows = engine_con.execute(
        f"SELECT ai_query('{CHAT_ENDPOINT}', r, modelParameters => {{'max_tokens': 2}}), ai_embed('{EMBED_ENDPOINT}', r) "
        f"FROM (VALUES (NULL), (''), ('hello')) t(r)"
    ).fetchall()
    assert rows[0] == (None, None)
    assert rows[1][0] is not None and len(rows[1][1]) == 384
    assert rows[2][0] is not None and len(rows[2][1]) == 384


@pytest.mark.engine
def test_ai_embed_is_a_fixed_size_float_array(engine_con, embed_engine):
    con = engine_con
    assert con.execute(f"SELECT typeof(ai_embed('{EMBED_ENDPOINT}', 'x'))").fetchone() == ("FLOAT[384]",)
    [(similar, unrelated)] = con.execute(
        f"""WITH v AS (SELECT ai_embed('{EMBED_ENDPOINT}', 'A dog runs in the park.') a,
                              ai_embed('{EMBED_ENDPOINT}', 'A puppy is running on the grass.') b,
                              ai_embed('{EMBED_ENDPOINT}', 'The invoice is overdue.') c)
            SELECT array_cosine_similarity(a, b), array_cosine_similarity(a, c) FROM v"""
    ).fetchall()
    assert similar > unrelated + 0.2
