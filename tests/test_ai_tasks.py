"""The task functions, ai_filter, ai_similarity and the AI aggregates: DuckDB and REST.

Arguments and external providers run against a real OpenAI-protocol server on 127.0.0.1
(tests/fake_providers.py), which also shows that a refused argument never reaches it. The
constrained answers, filters, joins and aggregates run on the bundled models. Spark's side is in
tests/test_spark.py (the same queries, the same typed answers).
"""

from __future__ import annotations

import duckdb
import pytest

from ai_functions.errors import CastError, InvalidArgument, InvalidMaxWords
from ai_functions.tasks import SENTIMENTS
from connectors.duckdb import connect, execute_within, explain, functions, translate_error
from ai_functions.explain import Budget
from serving.data.client import InProcessClient
from serving.data.directory import EndpointDirectory
from serving.data.providers import OpenAICompatibleBackend
from serving.data.result_store import ResultStore
from tests.conftest import CHAT_ENDPOINT, EMBED_ENDPOINT
from tests.registry_helpers import external_endpoint

REVIEWS = [
    "Battery died after two days and support never answered.",
    "Absolutely love it, the sound is crisp and it charges fast.",
    "It works. Nothing special about it.",
    "Great screen but the speakers crackle at high volume.",
    "Arrived broken and the refund took a month.",
    "Best purchase this year, my kids use it every day.",
]


@pytest.fixture
def provider_con(upstream):
    """DuckDB whose default task endpoint is an OpenAI-protocol provider on 127.0.0.1."""
    directory = EndpointDirectory()
    directory.register("ext", "llm/v1/chat", OpenAICompatibleBackend("llm/v1/chat", "model-x", upstream.url, lambda: "k"))
    con = connect(client=InProcessClient(directory))
    functions(con).chat_endpoint = "ext"
    yield con
    con.close()


def failure(con, query: str):
    """The sqlinfer error a failed DuckDB query is reported as."""
    with pytest.raises(duckdb.Error) as caught:
        con.execute(query).fetchall()
    return translate_error(con, caught.value)


@pytest.mark.parametrize("call, error, names", [
    ("ai_summarize(t, -1)", InvalidMaxWords, "but got -1"),
    ("ai_summarize(t, max_words := 1.5)", InvalidMaxWords, "but got 1.5"),
    ("ai_classify(t, ['only one'])", InvalidArgument, "2 to 20 labels, got 1: ['only one']"),
    ("ai_classify(t, ['a', 'a'])", InvalidArgument, "labels must be distinct, got ['a', 'a']"),
    ("ai_classify(t, ['a', 'b'], options := {'multi': true})", InvalidArgument, "unknown option 'multi'"),
    ("ai_classify(t, ['a', 'b'], options := {'multilabel': 'maybe'})", InvalidArgument, "multilabel must be true or false, got 'maybe'"),
    ("ai_translate(t, 'klingon')", InvalidArgument, "to_lang 'klingon' is not supported"),
    ("ai_extract(t, '{\"type\": \"string\"}')", InvalidArgument, "schema must describe an object"),
    ("ai_extract(t, 'STRUCT<a: DECIMAL>')", InvalidArgument, "DECIMAL"),
    ("ai_mask(t, [])", InvalidArgument, "1 to 50 labels, got 0"),
    ("ai_filter('{0} and {1}', t)", InvalidArgument, "uses {1} but only 1 value(s) follow it"),
])
def test_every_bad_argument_fails_before_any_call_with_its_class_and_value(provider_con, upstream, call, error, names):
    found = failure(provider_con, f"SELECT {call} FROM (VALUES ('some text')) v(t)")
    assert isinstance(found, error), found
    assert names in found.message and found.message.startswith(f"[{error.error_code}]")
    assert upstream.calls == []  # refused before anything was sent


def test_null_in_gives_null_out_and_is_never_sent(provider_con, upstream):
    row = provider_con.execute(
        "SELECT ai_classify(NULL, ['a', 'b']), ai_analyze_sentiment(NULL), ai_summarize(NULL), ai_translate(NULL, 'es'), "
        "ai_fix_grammar(NULL), ai_mask(NULL, ['person']), ai_gen(NULL), ai_extract(NULL, ['person']), "
        "ai_filter('{0} is red', NULL), ai_classify(NULL, ['a', 'b'], options := {'multilabel': true})").fetchone()
    assert row == (None,) * 10
    assert upstream.calls == []
    types = provider_con.execute("SELECT typeof(ai_extract(NULL, ['person', 'city'])), typeof(ai_filter(NULL)), "
                                 "typeof(ai_classify(NULL, ['a', 'b'], options := {'multilabel': true})), "
                                 "typeof(ai_similarity(NULL, 'x'))").fetchone()
    assert types == ("STRUCT(person VARCHAR, city VARCHAR)", "BOOLEAN", "VARCHAR[]", "FLOAT")


def test_a_provider_gets_the_label_enum_and_a_label_outside_it_fails_the_row(provider_con, upstream):
    rows = provider_con.execute("SELECT ai_classify(t, ['bug', 'feature']) FROM (VALUES ('bug'), ('feature')) v(t) "
                                "ORDER BY t").fetchall()
    assert rows == [("bug",), ("feature",)]
    schema = upstream.calls[0][1]["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["answer"]["enum"] == ["bug", "feature", "Bug", "Feature"]
    found = failure(provider_con, "SELECT ai_classify(t, ['bug', 'feature']) FROM (VALUES ('banana')) v(t)")
    assert isinstance(found, CastError)
    assert "ai_classify answered 'banana', which is not one of its labels" in found.message


def test_where_and_join_on_ai_filter_keep_exactly_what_the_provider_accepted(provider_con, upstream):
    """A provider whose verdicts are scripted (the statement is its answer), so the expected rows are known."""
    provider_con.execute("CREATE TABLE a(id INTEGER, verdict VARCHAR)")
    provider_con.executemany("INSERT INTO a VALUES (?, ?)", [[1, "True"], [2, "False"], [3, "True"], [4, None]])
    provider_con.execute("CREATE TABLE b AS SELECT range AS k FROM range(3)")
    kept = provider_con.execute("SELECT id FROM a WHERE ai_filter('{0}', verdict) ORDER BY id").fetchall()
    assert kept == [(1,), (3,)]
    pairs = provider_con.execute("SELECT a.id, b.k FROM a JOIN b ON ai_filter('{0}', a.verdict) ORDER BY 1, 2").fetchall()
    assert pairs == [(i, k) for i in (1, 3) for k in range(3)]
    assert all(call[1]["response_format"]["json_schema"]["schema"]["properties"]["answer"]["enum"][:2] == ["True", "False"]
               for call in upstream.calls)


def test_the_endpoint_is_per_call_then_per_connection_then_the_environment(provider_con, upstream, monkeypatch):
    monkeypatch.setenv("SQLINFER_AI_FUNCTIONS_ENDPOINT", "from-env")
    assert provider_con.execute("SELECT ai_gen('hi')").fetchone() == ("hi",)  # the connection's default: ext
    provider_con.execute("SET VARIABLE ai_functions_endpoint = 'nowhere'")
    assert "nowhere" in failure(provider_con, "SELECT ai_gen('hi')").message
    assert provider_con.execute("SELECT ai_gen('hi', endpoint => 'ext')").fetchone() == ("hi",)
    provider_con.execute("RESET VARIABLE ai_functions_endpoint")
    functions(provider_con).chat_endpoint = None
    assert "from-env" in failure(provider_con, "SELECT ai_gen('hi')").message


# -- on the bundled models -------------------------------------------------------------------------


@pytest.fixture
def engine_con(chat_engine, embed_engine, tmp_path):
    con = connect()
    functions(con).store = ResultStore(tmp_path / "results.db")  # so a second query sees the first one's answers
    con.execute("CREATE TABLE reviews(id INTEGER, review VARCHAR)")
    con.executemany("INSERT INTO reviews VALUES (?, ?)", list(enumerate(REVIEWS)))
    yield con
    con.close()


@pytest.mark.engine
def test_constrained_labels_are_always_in_the_set(engine_con):
    labels = ["bug report", "praise", "question", "complaint"]
    rows = engine_con.execute(f"SELECT ai_classify(review, {labels}), ai_analyze_sentiment(review), "
                              f"ai_classify(review, {labels}, options := {{'multilabel': true}}) FROM reviews").fetchall()
    assert len(rows) == len(REVIEWS)
    for single, sentiment, several in rows:
        assert single in labels and sentiment in SENTIMENTS
        assert isinstance(several, list) and set(several) <= set(labels) and len(set(several)) == len(several)
    described = engine_con.execute("SELECT ai_classify(review, MAP {'good': 'the buyer is happy', 'bad': 'the buyer is not'}) "
                                   "FROM reviews").fetchall()
    assert {answer for (answer,) in described} <= {"good", "bad"}


@pytest.mark.engine
def test_extract_summarize_translate_mask_and_gen_answer_on_the_engine(engine_con):
    extracted, summary, translated, masked, generated = engine_con.execute(
        "SELECT ai_extract('John Doe lives in New York.', ['person', 'location']), ai_summarize(review, 10), "
        "ai_translate(review, 'Spanish'), ai_mask('John Doe lives in New York.', ['person']), ai_gen('Say hello.') "
        "FROM reviews WHERE id = 0").fetchone()
    assert set(extracted) == {"person", "location"} and all(v is None or isinstance(v, str) for v in extracted.values())
    assert all(isinstance(v, str) and v.strip() for v in (summary, translated, masked, generated))


@pytest.mark.engine
def test_where_ai_filter_keeps_exactly_the_rows_the_model_accepted(engine_con):
    judged = dict(engine_con.execute("SELECT id, ai_filter('The review ''{0}'' is negative.', review) FROM reviews").fetchall())
    assert set(judged.values()) <= {True, False}
    kept = {i for (i,) in engine_con.execute(
        "SELECT id FROM reviews WHERE ai_filter('The review ''{0}'' is negative.', review)").fetchall()}
    assert kept == {i for i, accepted in judged.items() if accepted}


@pytest.mark.engine
def test_a_join_on_ai_filter_returns_the_accepted_pairs_in_one_batch(engine_con):
    engine_con.execute("CREATE TABLE topics(topic VARCHAR)")
    engine_con.executemany("INSERT INTO topics VALUES (?)", [["the battery"], ["the price"], ["the sound"]])
    ai = functions(engine_con)
    ai.stats.reset()
    judged = engine_con.execute("SELECT id, topic, ai_filter('The review ''{0}'' talks about {1}.', review, topic) "
                                "FROM reviews, topics").fetchall()
    assert len(judged) == len(REVIEWS) * 3
    assert ai.stats.snapshot().requests == len(judged)  # every pair asked once
    joined = engine_con.execute("SELECT id, topic FROM reviews JOIN topics ON "
                                "ai_filter('The review ''{0}'' talks about {1}.', review, topic)").fetchall()
    assert sorted(joined) == sorted((i, t) for i, t, accepted in judged if accepted)
    planned = explain(engine_con, "SELECT id FROM reviews JOIN topics ON ai_filter('The review ''{0}'' talks about {1}!', review, topic)")
    [call] = planned
    assert (call.function, call.rows, call.to_send) == ("ai_filter", len(REVIEWS) * 3, len(REVIEWS) * 3)


@pytest.mark.engine
def test_ai_similarity_ranks_and_equal_texts_score_one(engine_con):
    same, near, far, null = engine_con.execute(
        "SELECT ai_similarity('the battery is dead', 'the battery is dead'), ai_similarity('the battery is dead', "
        "'the battery does not charge'), ai_similarity('the battery is dead', 'I like green tea'), "
        "ai_similarity(NULL, 'x')").fetchone()
    assert same == pytest.approx(1.0, abs=1e-5) and far < near < same and null is None


@pytest.mark.engine
def test_ai_agg_over_a_group_larger_than_the_context_completes_in_rounds(engine_con, monkeypatch):
    monkeypatch.setenv("SQLINFER_AI_AGG_MAX_TOKENS", "48")
    ai = functions(engine_con)
    lines = [f"Review {i}: {REVIEWS[i % len(REVIEWS)]} " * 3 for i in range(120)]
    tokens = sum(ai.client.count_tokens(CHAT_ENDPOINT, lines, "complete"))
    assert tokens > 2 * 2048  # the group does not fit the model's context
    engine_con.execute("CREATE TABLE big(grp INTEGER, line VARCHAR)")
    engine_con.executemany("INSERT INTO big VALUES (?, ?)", [[i % 2, line] for i, line in enumerate(lines)] + [[2, None]])
    query = "SELECT grp, ai_agg(line, 'List the complaints.') FROM big GROUP BY grp"
    [planned] = explain(engine_con, query)
    ai.stats.reset()
    answers = dict(engine_con.execute(query).fetchall())
    assert set(answers) == {0, 1, 2} and answers[2] is None  # a group of NULLs only gives NULL
    assert all(isinstance(answers[g], str) and answers[g] for g in (0, 1))
    snap = ai.stats.snapshot()
    assert snap.aggregate_groups == 2 and snap.aggregate_rounds >= 2
    assert planned.function == "ai_agg" and planned.to_send >= snap.requests > 2  # EXPLAIN: an upper bound
    assert "ai_agg: 2 groups in up to" in snap.summary()
    [summary] = engine_con.execute("SELECT ai_summarize_agg(review) FROM reviews").fetchone()
    assert isinstance(summary, str) and summary


@pytest.mark.engine
def test_task_functions_resume_from_the_store_and_budgets_refuse_them(engine_con):
    query = "SELECT ai_analyze_sentiment(review) FROM reviews"
    ai = functions(engine_con)
    first = engine_con.execute(query).fetchall()
    ai.stats.reset()
    assert engine_con.execute(query).fetchall() == first
    snap = ai.stats.snapshot()
    assert (snap.cache_hits, snap.requests) == (len(REVIEWS), 0)
    [estimate] = explain(engine_con, "SELECT ai_summarize(review, 5) FROM reviews")
    assert (estimate.function, estimate.rows, estimate.to_send) == ("ai_summarize", len(REVIEWS), len(REVIEWS))
    with pytest.raises(Exception, match="AI_FUNCTION_BUDGET_EXCEEDED"):
        execute_within(engine_con, "SELECT ai_summarize(review, 5) FROM reviews", Budget(max_tokens=10))


# -- REST ---------------------------------------------------------------------------------------------


@pytest.mark.engine
def test_rest_answers_a_batch_with_the_same_semantics_and_names_the_function_in_usage(server, admin, chat_engine, embed_engine):
    from serving.data.usage import UsageRecorder

    _, ordinary = server.service.auth.create_token("someone@example.com")
    with server.client(ordinary) as user:
        response = user.post("/api/2.0/ai-functions/ai_classify", json={
            "inputs": [REVIEWS[0], None, REVIEWS[1]], "arguments": {"labels": ["positive", "negative"]}})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["endpoint"] == CHAT_ENDPOINT and body["results"][1] is None
        assert all(r in ("positive", "negative") for r in (body["results"][0], body["results"][2]))
        scores = user.post("/api/2.0/ai-functions/ai_similarity", json={"inputs": [["a b", "a b"], [None, "x"]]}).json()
        assert scores["endpoint"] == EMBED_ENDPOINT and scores["results"][0] == pytest.approx(1.0, abs=1e-5)
        assert scores["results"][1] is None
        bad = user.post("/api/2.0/ai-functions/ai_summarize", json={"inputs": ["x"], "arguments": {"max_words": -3}})
        assert bad.status_code == 400 and bad.json()["error_code"] == "AI_FUNCTION_INVALID_MAX_WORDS"
        assert "but got -3" in bad.json()["message"]
        unknown = user.post("/api/2.0/ai-functions/ai_nope", json={"inputs": ["x"]})
        assert unknown.status_code == 404 and "ai_classify" in unknown.json()["message"]
        typo = user.post("/api/2.0/ai-functions/ai_gen", json={"inputs": ["x"], "argument": {}})
        assert typo.status_code == 400 and "argument" in typo.json()["message"]
        agg = user.post("/api/2.0/ai-functions/ai_agg", json={"inputs": REVIEWS, "arguments": {"instruction": "List the complaints."}})
        assert agg.status_code == 200 and agg.json()["rounds"] == 1 and agg.json()["result"]
    rows = UsageRecorder(server.service.db).rows(CHAT_ENDPOINT)
    assert {"ai_classify", "ai_agg"} <= {r["ai_function"] for r in rows}


def test_rest_checks_can_query_and_rate_limits_like_every_query_route(server, admin, upstream):
    from tests.test_rate_limits import start_of_a_window

    admin.post("/api/2.0/serving-endpoints", json=external_endpoint("limited", upstream.url)).raise_for_status()
    server.service.wait_for_deployments()
    admin.put("/api/2.0/serving-endpoints/limited/ai-gateway", json={"rate_limits": [
        {"calls": 3, "key": "endpoint", "renewal_period": "minute"}]}).raise_for_status()
    _, ordinary = server.service.auth.create_token("someone@example.com")
    body = {"inputs": ["positive"], "arguments": {"labels": ["positive", "negative"]}, "endpoint": "limited"}
    with server.client(ordinary) as user:
        refused = user.post("/api/2.0/ai-functions/ai_classify", json=body)
        assert refused.status_code == 403 and refused.json()["error_code"] == "PERMISSION_DENIED"
    assert upstream.calls == []
    start_of_a_window()
    answered = [admin.post("/api/2.0/ai-functions/ai_classify", json=body) for _ in range(2)]
    assert [a.status_code for a in answered] == [200, 200] and answered[0].json()["results"] == ["positive"]
    lenient = admin.post("/api/2.0/ai-functions/ai_classify", json={**body, "inputs": ["banana"], "failOnError": False})
    [row] = lenient.json()["results"]
    assert row["result"] is None and "answered 'banana', which is not one of its labels" in row["errorMessage"]
    over = admin.post("/api/2.0/ai-functions/ai_classify", json=body)
    assert over.status_code == 429 and over.json()["error_code"] == "REQUEST_LIMIT_EXCEEDED"
    assert len(upstream.calls) == 3  # the refused request never reached the provider
    refusals = [
        ("ai_filter", {"inputs": [[]], "endpoint": "limited"}, "inputs[0] must be [statement_or_template, value...]"),
        ("ai_similarity", {"inputs": [["a", "b"]], "arguments": {"labels": ["x"]}}, "arguments.labels: ai_similarity takes no arguments"),
        ("ai_summarize", {"inputs": ["x"], "arguments": {"max_words": 10**400}}, "more than sqlinfer's limit"),
        ("ai_classify", {"inputs": ["x"], "arguments": {"labels": {"a": "d" * 2000, "b": ""}}}, "at most 1000"),
    ]
    for function, request, message in refusals:
        refused = admin.post(f"/api/2.0/ai-functions/{function}", json=request)
        assert refused.status_code == 400 and message in refused.json()["message"], (function, refused.text)
    batch = admin.post("/api/2.0/sqlinfer/batch", json={"endpoint": "limited", "kind": "chat", "requests": ["x"],
                                                        "options": {"choice": ["a", "a"]}})
    assert batch.status_code == 400 and "choice must be 1 to 1000 distinct" in batch.json()["message"]
    assert len(upstream.calls) == 3
