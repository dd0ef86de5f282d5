"""ai_query semantics in DuckDB: every argument, every returnType, failOnError both ways, NULLs,
big inputs, both named-argument syntaxes, custom models, and structured output on the engine."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pytest

from ai_functions.spec import output_spec
from ai_functions.types import parse_type
from connectors.duckdb import connect
from ai_functions.errors import InvalidArgument
from serving.data.backends import EchoBackend
from tests.registry_helpers import duckdb_on


@pytest.fixture
def con():
    with duckdb_on("echo", EchoBackend(fail_on="FAIL")) as connection:
        yield connection


RETURN_TYPES = [  # (returnType, the echoed answer, the typed value, DuckDB's type)
    ("STRING", "plain words", "plain words", "VARCHAR"),
    ("FLOAT", "0.5", 0.5, "FLOAT"),
    ("DOUBLE", " 2.25 ", 2.25, "DOUBLE"),
    ("INT", "42", 42, "INTEGER"),
    ("BIGINT", "9000000000", 9000000000, "BIGINT"),
    ("SMALLINT", "7", 7, "SMALLINT"),
    ("TINYINT", "-3", -3, "TINYINT"),
    ("BOOLEAN", "true", True, "BOOLEAN"),
    ("ARRAY<FLOAT>", "[0.5, 1]", [0.5, 1.0], "FLOAT[]"),
    ("ARRAY<STRING>", '["a", "b"]', ["a", "b"], "VARCHAR[]"),
    ("STRUCT<label: STRING, score: DOUBLE>", '{"label": "pos", "score": 0.9}', {"label": "pos", "score": 0.9},
     'STRUCT("label" VARCHAR, score DOUBLE)'),
    ("STRUCT<tags: ARRAY<STRING>, meta: STRUCT<n INT>>", 'Sure: ```json\n{"tags": ["x"], "meta": {"n": 1}}\n```',
     {"tags": ["x"], "meta": {"n": 1}}, "STRUCT(tags VARCHAR[], meta STRUCT(n INTEGER))"),
]


@pytest.mark.parametrize("return_type, answer, value, duck_type", RETURN_TYPES)
def test_every_return_type_comes_back_typed(con, return_type, answer, value, duck_type):
    [(result, kind)] = con.execute("SELECT r, typeof(r) FROM (SELECT ai_query('echo', ?, returnType => ?) AS r)",
                                   [answer, return_type]).fetchall()
    assert kind == duck_type
    assert result == (pytest.approx(value) if isinstance(value, float) else value)


def test_both_named_argument_syntaxes_and_positional_return_type(con):
    rows = con.execute("SELECT ai_query('echo', '1', returnType => 'INT'), ai_query('echo', '1', returnType := 'INT'), "
                       "ai_query('echo', '1', 'INT'), ai_query('echo', 'a b c', modelParameters := {'max_tokens': 2}), "
                       "ai_query('echo', 'a b c', modelParameters => {'max_tokens': 1})").fetchall()
    assert rows == [(1, 1, 1, "a b", "a")]


def test_fail_on_error_false_keeps_the_schema_even_when_every_row_fails(con, tmp_path):
    table = con.execute("SELECT ai_query('echo', q, returnType => 'DOUBLE', failOnError => false) AS r "
                        "FROM (VALUES ('FAIL 1'), ('FAIL 2'), ('not a number')) t(q)").to_arrow_table()
    assert table.schema.field("r").type == pa.struct([("result", pa.float64()), ("errorMessage", pa.string())])
    rows = table.column("r").to_pylist()
    assert all(r["result"] is None for r in rows)
    assert "echo backend refused" in rows[0]["errorMessage"] and "expected DOUBLE" in rows[2]["errorMessage"]
    target = tmp_path / "out.parquet"
    con.execute(f"COPY (SELECT ai_query('echo', q, returnType => 'DOUBLE', failOnError := false) AS r "
                f"FROM (VALUES ('FAIL')) t(q)) TO '{target}' (FORMAT parquet)")
    assert con.execute(f"SELECT typeof(r) FROM '{target}'").fetchone()[0] == "STRUCT(result DOUBLE, errorMessage VARCHAR)"


def test_fail_on_error_true_names_the_first_failing_row(con):
    with pytest.raises(duckdb.Error, match=r"ai_query failed on endpoint 'echo' for request 'row FAIL'"):
        con.execute("SELECT ai_query('echo', q) FROM (VALUES ('fine'), ('row FAIL'), ('FAIL again')) t(q)").fetchall()
    with pytest.raises(duckdb.Error, match=r"for request 'twelve'.*after 2 repair attempt\(s\); the first answer was 'twelve'"):
        con.execute("SELECT ai_query('echo', q, returnType => 'INT') FROM (VALUES ('12'), ('twelve')) t(q)").fetchall()


def test_null_gives_null_and_an_empty_string_is_a_request(con):
    rows = con.execute("SELECT q, ai_query('echo', q), ai_query('echo', q, failOnError => false) "
                       "FROM (VALUES (NULL), ('')) t(q) ORDER BY q NULLS FIRST").fetchall()
    assert rows == [(None, None, None), ("", "", {"result": "", "errorMessage": None})]


def test_more_than_a_chunk_keeps_order_and_dedupes(con):
    registry_backend = EchoBackend()
    with duckdb_on("counted", registry_backend) as big:
        rows = big.execute("SELECT i, ai_query('counted', CAST(i % 1000 AS VARCHAR), returnType => 'INT') "
                           "FROM range(5000) t(i) ORDER BY i").fetchall()
    assert [n for _, n in rows] == [i % 1000 for i in range(5000)]
    assert sum(registry_backend.calls) < 5000  # repeated requests of a chunk were sent once


def test_bad_arguments_fail_before_any_call(con):
    backend = EchoBackend()
    with duckdb_on("watched", backend) as watched:
        cases = {
            "returnType => 'STRUCT<a INT'": r"returnType 'STRUCT<a INT': expected '>'",
            "returnType => 'MAP<STRING, INT>'": r"MAP is not supported",
            "responseFormat => '{\"type\": \"xml\"}'": r"responseFormat.type must be 'json_object' or 'json_schema'",
            "responseFormat => 'STRING'": r"must be a STRUCT<...> DDL",
            "returnType => 'INT', responseFormat => 'STRUCT<a INT>'": r"give returnType or responseFormat, not both",
            "modelParameters => {'n': 2}": r"AI_FUNCTION_INVALID_MODEL_PARAMETERS.*modelParameters.n is reserved",
            "modelParameters => {'temperature': 'hot'}": r"AI_FUNCTION_INVALID_MODEL_PARAMETERS.*temperature",
            "modelParameters => {'top_k': 5}": r"AI_FUNCTION_INVALID_MODEL_PARAMETERS.*top_k is not a supported parameter",
        }
        for arguments, message in cases.items():
            with pytest.raises(duckdb.Error, match=message):
                watched.execute(f"SELECT ai_query('watched', q, {arguments}) FROM (VALUES ('x')) t(q)").fetchall()
        assert backend.calls == []


def test_types_render_for_every_engine():
    parsed = parse_type("STRUCT<label: STRING, `odd name` ARRAY<DOUBLE>>")
    assert parsed.ddl() == "STRUCT<label: STRING, `odd name`: ARRAY<DOUBLE>>"
    assert parsed.arrow() == pa.struct([("label", pa.string()), ("odd name", pa.list_(pa.float64()))])
    assert parsed.json_schema()["required"] == ["label", "odd name"]
    spec = output_spec(None, '{"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", '
                             '"properties": {"n": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}}}}}', False)
    assert spec.spark_ddl() == "STRUCT<result: STRUCT<n: BIGINT, tags: ARRAY<STRING>>, errorMessage: STRING>"
    with pytest.raises(InvalidArgument, match="appears twice"):
        parse_type("STRUCT<a INT, a INT>")


@pytest.mark.engine
def test_response_format_holds_the_local_model_to_the_schema(chat_engine):
    local = connect()
    try:
        rows = local.execute(
            "SELECT ai_query('system-smollm2-135m-instruct', 'Give the city and country of the Eiffel Tower. ' || n, "
            "responseFormat => 'STRUCT<city: STRING, country: STRING>', modelParameters => {'max_tokens': 48}) AS r "
            "FROM (VALUES ('One.'), ('Two.')) t(n)").to_arrow_table()
        [(json_text,)] = local.execute(
            "SELECT ai_query('system-smollm2-135m-instruct', 'Describe Paris as JSON.', "
            "responseFormat => '{\"type\": \"json_object\"}', modelParameters => {'max_tokens': 48}, failOnError => false).errorMessage"
        ).fetchall()
    finally:
        local.close()
    assert rows.schema.field("r").type == pa.struct([("city", pa.string()), ("country", pa.string())])
    for value in rows.column("r").to_pylist():
        assert set(value) == {"city", "country"} and all(isinstance(v, str) for v in value.values())
    # max_tokens may cut a JSON object short; then the row says so instead of returning a bad value
    assert json_text is None or "not valid JSON" in json_text or "does not fit" in json_text


def test_a_query_reports_its_summary_with_cost_when_prices_are_set(con, monkeypatch):
    from connectors.duckdb import functions

    ai = functions(con)
    ai.stats.reset()
    ai.stats.set_price("echo", 2.0, 10.0)  # per million input / output tokens
    con.execute(
        "SELECT ai_query('echo', q, failOnError => false) FROM (VALUES ('one two'), ('one two'), ('three'), (NULL), ('x FAIL')) t(q)").fetchall()
    snap = ai.stats.snapshot()
    assert (snap.rows, snap.null_rows, snap.deduplicated, snap.requests, snap.errors) == (5, 1, 1, 3, 1)
    assert (snap.prompt_tokens, snap.completion_tokens) == (3, 3)  # the echo counts words; the failed row used none
    assert snap.cost == pytest.approx(3 * 2.0 / 1e6 + 3 * 10.0 / 1e6)
    assert "cost 0.000036" in snap.summary() and "1 answered by an identical request" in snap.summary()

    monkeypatch.setenv("SQLINFER_PRICES", "a=1/2, b = 0.5/0.25")
    from ai_functions.stats import QueryStats, prices_from_env

    assert prices_from_env() == {"a": (1.0, 2.0), "b": (0.5, 0.25)}
    assert QueryStats().snapshot().cost is None
    monkeypatch.setenv("SQLINFER_PRICES", "a=cheap")
    with pytest.raises(ValueError, match="must look like endpoint=INPUT/OUTPUT"):
        prices_from_env()


class FixableBackend(EchoBackend):
    """Answers with a wrong field name first; asked again with the validation error, gets it right."""

    def chat(self, conversations, options, on_result=None):
        self.calls.append(len(conversations))
        answers = []
        for messages in conversations:
            repaired = len(messages) > 1
            text = messages[0]["content"] if repaired else messages[0]["content"].replace('"n"', '"count"')
            answers.append(self._answer(text, options.model_copy(update={"max_tokens": None})))
        return answers


def test_answers_that_do_not_fit_are_repaired_and_the_detailed_form_says_so():
    with duckdb_on("fixable", FixableBackend()) as con:
        [(value,)] = con.execute("SELECT ai_query('fixable', '{\"n\": 3}', returnType => 'STRUCT<n INT>')").fetchall()
        [(detail,)] = con.execute("SELECT ai_query_detailed('fixable', '{\"n\": 4}', returnType => 'STRUCT<n INT>')").fetchall()
        [(kind,)] = con.execute("SELECT typeof(ai_query_detailed('fixable', 'x'))").fetchall()
    assert value == {"n": 3}
    assert detail["result"] == {"n": 4} and detail["errorMessage"] is None
    assert detail["attempts"] == 2 and detail["raw_text"] == '{"count": 4}' and detail["cache_hit"] is False
    assert detail["input_tokens"] > 0 and detail["output_tokens"] > 0
    assert kind.startswith("STRUCT(result VARCHAR, errorMessage VARCHAR, raw_text VARCHAR, attempts INTEGER")


def test_repairs_stop_after_the_configured_attempts_and_keep_the_raw_text(con, monkeypatch):
    monkeypatch.setenv("SQLINFER_REPAIR_ATTEMPTS", "1")
    [(row,)] = con.execute("SELECT ai_query_detailed('echo', 'no number here', returnType => 'INT')").fetchall()
    assert row["result"] is None and row["attempts"] == 2 and row["raw_text"] == "no number here"
    assert "after 1 repair attempt(s); the first answer was 'no number here'" in row["errorMessage"]
