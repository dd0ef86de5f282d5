"""ai_query / ai_embed in Spark local[2], with executors going to a `sqlinfer serve` subprocess.

The same server also answers a DuckDB connection through the same HTTP client, so the tests can
check that both connectors give the same typed answers and the same errors.
"""

from __future__ import annotations

import json
import os
import sys

import httpx
import pytest


pytestmark = pytest.mark.spark


@pytest.fixture(scope="module")
def spark(sqlinfer_server):
    os.environ["PYSPARK_PYTHON"] = sys.executable  # workers must import pandas/pyarrow from this venv
    from pyspark.sql import SparkSession

    from connectors import spark as sqlinfer_spark

    session = (SparkSession.builder.master("local[2]").appName("sqlinfer-tests")
               .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "2").getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    url, token = sqlinfer_server
    sqlinfer_spark.register(session, url=url, token=token)
    yield session
    session.stop()


@pytest.fixture(scope="module")
def duck(sqlinfer_server):
    from connectors.duckdb import connect
    from serving.data.http_client import HttpServingClient

    url, token = sqlinfer_server
    con = connect(client=HttpServingClient(url, token))
    yield con
    con.close()


def post_count(url: str) -> int:
    metrics = httpx.get(f"{url}/metrics").text
    return sum(int(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith('sqlinfer_http_requests_total{method="POST"'))


QUERIES = [  # the same SQL in DuckDB and in Spark (via connectors.spark.sql for typed results)
    "SELECT q, ai_query('system-echo', q) AS r FROM VALUES ('hello there'), (NULL), ('') AS t(q) ORDER BY q NULLS LAST",
    "SELECT q, ai_query('system-echo', q, returnType => 'DOUBLE') AS r FROM VALUES ('0.25'), ('2') AS t(q) ORDER BY q NULLS LAST",
    "SELECT q, ai_query('system-echo', q, 'ARRAY<INT>') AS r FROM VALUES ('[1, 2, 3]') AS t(q)",
    "SELECT q, ai_query('system-echo', q, returnType => 'STRUCT<label: STRING, score: DOUBLE>') AS r "
    "FROM VALUES ('{\"label\": \"good\", \"score\": 0.9}') AS t(q)",
    "SELECT q, ai_query('system-echo', q, returnType => 'BOOLEAN', failOnError => false) AS r "
    "FROM VALUES ('true'), ('maybe'), (NULL) AS t(q) ORDER BY q NULLS LAST",
    "SELECT q, ai_query('system-echo', q, failOnError => false, modelParameters => named_struct('max_tokens', 2)) AS r "
    "FROM VALUES ('one two three') AS t(q)",
]


def normalize(value):
    """Spark Rows and DuckDB tuples/dicts as plain Python values."""
    if hasattr(value, "asDict"):
        return {k: normalize(v) for k, v in value.asDict().items()}
    if isinstance(value, dict):
        return {k: normalize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalize(v) for v in value]
    return value


def test_the_same_queries_give_the_same_typed_answers_in_duckdb_and_spark(spark, duck):
    from connectors import spark as sqlinfer_spark

    for query in QUERIES:
        duck_query = query.replace("named_struct('max_tokens', 2)", "{'max_tokens': 2}")
        expected = [normalize(row) for row in duck.execute(duck_query).fetchall()]
        got = [normalize(list(row)) for row in sqlinfer_spark.sql(spark, query).collect()]
        assert got == expected, query
    typed = sqlinfer_spark.sql(spark, QUERIES[4]).schema["r"].dataType.simpleString()
    assert typed == "struct<result:boolean,errorMessage:string>"
    answers = {r["q"]: r["r"] for r in sqlinfer_spark.sql(spark, QUERIES[4]).collect()}
    assert answers["true"]["result"] is True and answers["true"]["errorMessage"] is None
    assert answers["maybe"]["result"] is None and "the first answer was 'maybe'" in answers["maybe"]["errorMessage"]
    assert answers[None] is None


def test_failures_fail_the_query_the_same_way_in_both(spark, duck):
    from connectors import spark as sqlinfer_spark

    query = "SELECT ai_query('system-echo', q, returnType => 'INT') FROM VALUES ('1'), ('seven') AS t(q)"
    with pytest.raises(Exception, match=r"ai_query failed on endpoint 'system-echo' for request 'seven'.*expected INT"):
        duck.execute(query).fetchall()
    with pytest.raises(Exception, match=r"ai_query failed on endpoint 'system-echo' for request 'seven'.*expected INT"):
        sqlinfer_spark.sql(spark, query).collect()
    bad_parameters = "SELECT ai_query('system-echo', 'x', modelParameters => named_struct('temperature', 9.0))"
    with pytest.raises(Exception, match=r"AI_FUNCTION_INVALID_MODEL_PARAMETERS.*temperature"):
        spark.sql(bad_parameters).collect()
    with pytest.raises(Exception, match=r"returnType 'STRUCT<a: DECIMAL>'.*DECIMAL is not supported"):
        sqlinfer_spark.sql(spark, "SELECT ai_query('system-echo', 'x', returnType => 'STRUCT<a: DECIMAL>')")


def as_plain_text(value):
    """What the STRING-typed ai_query of plain spark.sql returns for DuckDB's typed value (README
    table): scalars as their text, structs and arrays as JSON text."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return value  # a dict or list: compared with the JSON text parsed back


def test_plain_spark_sql_gives_duckdbs_answers(spark, duck):
    for query in QUERIES:
        duck_query = query.replace("named_struct('max_tokens', 2)", "{'max_tokens': 2}")
        expected = [normalize(row) for row in duck.execute(duck_query).fetchall()]
        got = [list(row) for row in spark.sql(query).collect()]
        assert len(got) == len(expected), query
        for (q, answer), (duck_q, duck_answer) in zip(got, expected):
            assert q == duck_q, query
            if isinstance(duck_answer, (dict, list)):
                assert json.loads(answer) == duck_answer, query  # a struct travels as JSON text
            else:
                assert answer == as_plain_text(duck_answer), query  # plain text stays plain
    [row] = spark.sql("SELECT ai_query('system-echo', 'hello') AS a").collect()
    assert row["a"] == "hello"  # not '"hello"'
    [row] = spark.sql("SELECT ai_query(endpoint => 'system-echo', request => '7', returnType => 'INT') AS r").collect()
    assert row["r"] == "7"


def test_the_typed_rewrite_reads_sql_as_spark_does(spark):
    from connectors import spark as sqlinfer_spark

    query = ("SELECT /* ai_query('x', 'y') */ ai_query('system-echo', concat('a, b', ai_query('system-echo', 'in(ner)')), "
             "returnType => 'STRING') AS r, 'ai_query(not, a, call)' AS s, "
             "ai_query('system-echo', '[1, 2]', returnType => 'ARRAY<INT>') AS n -- ai_query(\n")
    [row] = sqlinfer_spark.sql(spark, query).collect()
    assert row["r"] == "a, bin(ner)" and row["s"] == "ai_query(not, a, call)" and row["n"] == [1, 2]
    with pytest.raises(Exception, match="ai_query has no argument 'colour'"):
        sqlinfer_spark.sql(spark, "SELECT ai_query('system-echo', 'x', colour => 'red')")


def test_a_partition_goes_to_the_server_in_one_request_and_order_is_kept(spark, sqlinfer_server):
    from connectors import spark as sqlinfer_spark

    url, _ = sqlinfer_server
    frame = spark.range(5000, numPartitions=2).selectExpr("CAST(id AS STRING) AS q")
    before = post_count(url)
    rows = frame.select("q", sqlinfer_spark.ai_query("system-echo", "q", returnType="BIGINT").alias("n")).collect()
    after = post_count(url)
    assert len(rows) == 5000 and all(int(r["q"]) == r["n"] for r in rows)
    assert after - before <= 2  # one batch request per partition, never one per row

    vectors = spark.range(3).selectExpr("CAST(id AS STRING) AS t").select(sqlinfer_spark.ai_embed("system-echo-embeddings", "t").alias("v"))
    assert [len(r["v"]) for r in vectors.collect()] == [8, 8, 8]
    [embedded] = spark.sql("SELECT ai_embed('system-echo-embeddings', 'a') AS v").collect()
    assert len(embedded["v"]) == 8


def test_the_dataframe_api_is_typed(spark):
    from pyspark.sql import functions as F

    from connectors import spark as sqlinfer_spark

    frame = spark.createDataFrame([("{\"label\": \"ok\", \"score\": 1}",), ("oops",)], ["q"])
    result = frame.select(sqlinfer_spark.ai_query("system-echo", F.col("q"), returnType="STRUCT<label: STRING, score: DOUBLE>",
                                                  failOnError=False).alias("r"))
    assert result.schema["r"].dataType.simpleString() == "struct<result:struct<label:string,score:double>,errorMessage:string>"
    first, second = [r["r"] for r in result.collect()]
    assert first["result"]["label"] == "ok" and first["result"]["score"] == 1.0 and first["errorMessage"] is None
    assert second["result"] is None and "expected JSON" in second["errorMessage"]
    with pytest.raises(Exception, match="returnType 'FLOATY'"):
        sqlinfer_spark.ai_query("system-echo", "q", returnType="FLOATY")


def test_custom_models_take_struct_requests(spark, duck):
    from connectors import spark as sqlinfer_spark

    struct = ("named_struct('sepal length (cm)', 5.1, 'sepal width (cm)', 3.5, 'petal length (cm)', 1.4, "
              "'petal width (cm)', 0.2)")
    [row] = sqlinfer_spark.sql(spark, f"SELECT ai_query('iris', {struct}, returnType => 'BIGINT') AS label").collect()
    duck_struct = "{'sepal length (cm)': 5.1, 'sepal width (cm)': 3.5, 'petal length (cm)': 1.4, 'petal width (cm)': 0.2}"
    [(duck_label,)] = duck.execute(f"SELECT ai_query('iris', {duck_struct}, returnType => 'BIGINT')").fetchall()
    assert row["label"] == duck_label == 0  # setosa
    with pytest.raises(Exception, match="must be a STRUCT of named input fields"):
        spark.sql("SELECT ai_query('iris', 'not a struct')").collect()


@pytest.mark.engine
def test_databricks_examples_run_unchanged_on_the_local_engine(spark):
    from connectors import spark as sqlinfer_spark

    spark.createDataFrame([("Paris is the capital and largest city of France. It is known for the Eiffel Tower.",)],
                          ["text"]).createOrReplaceTempView("articles")
    [summary] = spark.sql(
        "SELECT text, ai_query('system-smollm2-135m-instruct', 'Summarize the given text in one short sentence: ' || text, "
        "modelParameters => named_struct('max_tokens', 24, 'temperature', 0.0)) AS summary FROM articles").collect()
    assert summary["summary"] and "Paris" in summary["summary"]
    [extracted] = sqlinfer_spark.sql(spark, (
        "SELECT ai_query('system-smollm2-135m-instruct', 'Extract the city and country from: ' || text, "
        "responseFormat => 'STRUCT<city: STRING, country: STRING>', modelParameters => named_struct('max_tokens', 40)) AS r "
        "FROM articles")).collect()
    assert set(extracted["r"].asDict()) == {"city", "country"} and isinstance(extracted["r"]["city"], str)


# -- the task functions: the same typed answers as DuckDB --------------------------------------------

TASK_DATA = "FROM VALUES (1, 'I love this blender, it is great'), (2, 'It broke after one day'), (3, NULL) AS t(i, q)"
TASK_QUERIES = [  # (Spark SQL, DuckDB SQL): the same calls, each engine's spelling of arrays and maps
    ("SELECT i, ai_classify(q, array('positive', 'negative')) AS r " + TASK_DATA,
     "SELECT i, ai_classify(q, ['positive', 'negative']) AS r " + TASK_DATA),
    ("SELECT i, ai_analyze_sentiment(q) AS r " + TASK_DATA, None),
    ("SELECT i, ai_extract(q, array('product', 'problem')) AS r " + TASK_DATA,
     "SELECT i, ai_extract(q, ['product', 'problem']) AS r " + TASK_DATA),
    ("SELECT i, ai_classify(q, array('bug', 'praise'), map('multilabel', 'true')) AS r " + TASK_DATA,
     "SELECT i, ai_classify(q, ['bug', 'praise'], options := {'multilabel': 'true'}) AS r " + TASK_DATA),
    ("SELECT i, ai_filter('The text ''{0}'' is negative.', q) AS r " + TASK_DATA, None),
    ("SELECT i, ai_summarize(q, 5) AS r " + TASK_DATA, None),
    ("SELECT i, round(ai_similarity(q, 'a great blender'), 4) AS r " + TASK_DATA, None),
]


@pytest.fixture(scope="module")
def storing_server(tmp_path_factory):
    """A `sqlinfer serve` with its result store on (the suite turns stores off): what one connector
    asked first, the other's identical request is answered from, so a comparison between them does
    not depend on batch invariance, which bfloat16 does not have. Yields (url, admin token)."""
    from serving.control.service import EndpointService
    from tests.rest_server import sqlinfer_serve

    home = tmp_path_factory.mktemp("storing-home")
    _, token = EndpointService(home).auth.create_token("spark-job", is_admin=True)
    with sqlinfer_serve(os.environ | {"SQLINFER_HOME": str(home), "SQLINFER_RESULT_STORE": "on"}) as url:
        yield url, token


@pytest.mark.engine
@pytest.mark.slow  # about 200 s on 2 cores: in `make test-slow`, which CI runs too
def test_the_task_functions_give_duckdbs_typed_answers_in_spark(spark, sqlinfer_server, storing_server):
    """DuckDB asks first; Spark's identical requests are then answered from the server's store, so
    the comparison holds whatever the CPU's dtype does to batch invariance."""
    from connectors import spark as sqlinfer_spark
    from connectors.duckdb import connect
    from serving.data.http_client import HttpServingClient

    url, token = storing_server
    sqlinfer_spark.register(spark, url=url, token=token)
    duck = connect(client=HttpServingClient(url, token))
    try:
        _compare_task_functions(spark, duck)
    finally:
        duck.close()
        sqlinfer_spark.register(spark, url=sqlinfer_server[0], token=sqlinfer_server[1])  # the module's other tests


def _compare_task_functions(spark, duck) -> None:
    from connectors import spark as sqlinfer_spark

    for spark_query, duck_query in TASK_QUERIES:
        expected = [normalize(row) for row in duck.execute((duck_query or spark_query) + " ORDER BY i").fetchall()]
        got = [normalize(list(row)) for row in sqlinfer_spark.sql(spark, spark_query + " ORDER BY i").collect()]
        assert got == expected, spark_query
        assert expected[2][1] is None  # NULL in, NULL out
    typed = sqlinfer_spark.sql(spark, TASK_QUERIES[2][0]).schema["r"].dataType.simpleString()
    assert typed == "struct<product:string,problem:string>"
    assert sqlinfer_spark.sql(spark, TASK_QUERIES[3][0]).schema["r"].dataType.simpleString() == "array<string>"
    assert spark.sql(TASK_QUERIES[4][0]).schema["r"].dataType.simpleString() == "boolean"
    plain = {r["i"]: r["r"] for r in spark.sql(TASK_QUERIES[2][0]).collect()}  # plain spark.sql: the struct as JSON text
    assert json.loads(plain[1]) == {k: v for k, v in normalize(duck.execute(TASK_QUERIES[2][1] + " ORDER BY i").fetchone()[1]).items()}
    spark.sql("SELECT * FROM VALUES ('battery'), ('price') AS s(topic)").createOrReplaceTempView("topics")
    spark.sql("SELECT * " + TASK_DATA).createOrReplaceTempView("texts")
    condition = "ai_filter('The text ''{0}'' is about the {1}.', q, topic)"
    judged = spark.sql(f"SELECT i, topic, {condition} AS k FROM texts, topics").collect()  # then answered from the store
    joined = spark.sql(f"SELECT i, topic FROM texts JOIN topics ON {condition}").collect()
    assert sorted((r["i"], r["topic"]) for r in joined) == sorted((r["i"], r["topic"]) for r in judged if r["k"])
    grouped = "SELECT i % 2 AS g, ai_agg(q, 'List the problems.') AS r " + TASK_DATA + " GROUP BY i % 2 ORDER BY g"
    assert [list(r) for r in spark.sql(grouped).collect()] == [list(r) for r in duck.execute(grouped).fetchall()]


def test_bad_task_arguments_fail_on_the_driver_before_any_call(spark, sqlinfer_server):
    from ai_functions.errors import InvalidArgument, InvalidMaxWords
    from connectors import spark as sqlinfer_spark

    url, _ = sqlinfer_server
    before = post_count(url)
    with pytest.raises(InvalidMaxWords, match=r"\[AI_FUNCTION_INVALID_MAX_WORDS\].*but got -1"):
        sqlinfer_spark.sql(spark, "SELECT ai_summarize(q, -1) FROM VALUES ('x') AS t(q)")
    with pytest.raises(InvalidArgument, match=r"2 to 20 labels, got 1: \['a'\]"):
        sqlinfer_spark.sql(spark, "SELECT ai_classify(q, array('a')) FROM VALUES ('x') AS t(q)")
    with pytest.raises(Exception, match=r"AI_FUNCTION_INVALID_ARGUMENT.*to_lang 'xx' is not supported"):
        spark.sql("SELECT ai_translate(q, 'xx') FROM VALUES ('x') AS t(q)").collect()  # plain spark.sql: in the task
    with pytest.raises(InvalidArgument, match="unknown option 'multi'"):
        sqlinfer_spark.ai_classify("q", ["a", "b"], options={"multi": True})
    assert post_count(url) == before
