"""The query path: registered and system endpoints answer the OpenAI SDK, /invocations and ai_query.

The REST server runs in this process on a real socket, so it shares the session's engines.
"""

from __future__ import annotations

import collections
import random

import pytest

from connectors.duckdb import connect
from engine.types import SamplingOptions
from serving.data.backends import EchoBackend
from serving.data.client import InProcessClient
from serving.data.directory import directory_for
from serving.data.routing import TrafficSplitBackend
from tests.conftest import CHAT_ENDPOINT, EMBED_ENDPOINT
from tests.registry_helpers import local_entity, wait_until_settled

TWO_ENTITIES = {
    "served_entities": [{"entity_name": "smollm2-135m-instruct", "name": "blue"},
                        {"entity_name": "system.ai.smollm2-135m-instruct", "name": "green"}],
    "traffic_config": {"routes": [{"served_model_name": "blue", "traffic_percentage": 70},
                                  {"served_model_name": "green", "traffic_percentage": 30}]},
}


@pytest.fixture
def openai_client(server, admin):
    from openai import OpenAI

    _, token = server.service.auth.create_token("sdk-user", is_admin=True)
    return OpenAI(base_url=f"{server.url}/serving-endpoints", api_key=token, max_retries=0)


def test_traffic_split_follows_the_percentages():
    split = TrafficSplitBackend("llm/v1/chat", [("a", 70, EchoBackend()), ("b", 20, EchoBackend()), ("c", 10, EchoBackend()),
                                                ("off", 0, EchoBackend())], rng=random.Random(7))
    prompts = [[{"role": "user", "content": f"row {i}"}] for i in range(4000)]
    results = split.chat(prompts, SamplingOptions(max_tokens=5))
    assert [r.text for r in results] == [f"row {i}" for i in range(4000)]  # input order kept
    counts = collections.Counter(r.served_entity for r in results)
    assert set(counts) == {"a", "b", "c"}
    # 4000 draws: the standard deviation of a 10% share is ~0.5 points; allow 2.5
    for entity, share in (("a", 0.70), ("b", 0.20), ("c", 0.10)):
        assert abs(counts[entity] / 4000 - share) < 0.025, counts


@pytest.mark.engine
def test_the_openai_sdk_works_unchanged_on_system_endpoints(openai_client, chat_engine, embed_engine):
    raw = openai_client.chat.completions.with_raw_response.create(
        model=CHAT_ENDPOINT, messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        max_tokens=8, temperature=0)
    assert raw.headers["served-model-name"] == "smollm2-135m-instruct"
    chat = raw.parse()
    assert "Paris" in chat.choices[0].message.content
    assert chat.usage.completion_tokens > 0 and chat.choices[0].finish_reason in ("stop", "length")

    completion = openai_client.completions.create(model=CHAT_ENDPOINT, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert "Paris" in completion.choices[0].text

    embeddings = openai_client.embeddings.create(model=EMBED_ENDPOINT, input=["a cat", "a kitten"])
    assert [len(d.embedding) for d in embeddings.data] == [384, 384]


@pytest.mark.engine
def test_registered_endpoints_answer_invocations_with_their_traffic_split(server, admin, chat_engine):
    admin.post("/api/2.0/serving-endpoints", json={"name": "two-colours", "config": TWO_ENTITIES}).raise_for_status()
    wait_until_settled(admin, "two-colours")
    served = collections.Counter()
    for _ in range(12):
        response = admin.post("/serving-endpoints/two-colours/invocations",
                              json={"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2})
        assert response.status_code == 200, response.text
        assert response.json()["object"] == "chat.completion"
        served[response.headers["served-model-name"]] += 1
    assert set(served) <= {"blue", "green"} and served["blue"] > 0

    unknown = admin.post("/serving-endpoints/two-colours/invocations", json={"messages": [{"role": "user", "content": "x"}], "colour": 1})
    assert unknown.status_code == 400 and "colour: unknown field 'colour'" in unknown.json()["message"]


@pytest.mark.engine
def test_querying_needs_can_query(server, admin, chat_engine):
    from openai import OpenAI, PermissionDeniedError

    admin.post("/api/2.0/serving-endpoints", json={"name": "private", "config": local_entity()}).raise_for_status()
    endpoint = wait_until_settled(admin, "private")
    _, token = server.service.auth.create_token("carol")
    carol = OpenAI(base_url=f"{server.url}/serving-endpoints", api_key=token, max_retries=0)
    ask = {"model": "private", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2}
    with pytest.raises(PermissionDeniedError, match="needs CAN_QUERY"):
        carol.chat.completions.create(**ask)
    admin.patch(f"/api/2.0/permissions/serving-endpoints/{endpoint['id']}",
                json={"access_control_list": [{"user_name": "carol", "permission_level": "CAN_QUERY"}]}).raise_for_status()
    assert carol.chat.completions.create(**ask).choices[0].message.content
    # every user may query the system endpoints
    assert carol.chat.completions.create(**(ask | {"model": CHAT_ENDPOINT})).choices[0].message.content


@pytest.mark.engine
def test_ai_query_calls_registered_endpoints_and_follows_config_updates(service, chat_engine):
    service.create({"name": "sql-chat", "config": local_entity(name="first")})
    service.wait_for_deployments()
    con = connect(client=InProcessClient(directory_for(service)))
    try:
        [(answer,)] = con.execute("SELECT ai_query('sql-chat', 'What is the capital of France? Answer in one word.', "
                                  "modelParameters => {'max_tokens': 8})").fetchall()
        assert "Paris" in answer
        service.update_config("sql-chat", local_entity("system.ai.smollm2-135m-instruct", name="second"))
        service.wait_for_deployments()
        [(again,)] = con.execute("SELECT ai_query('sql-chat', 'What is the capital of France? Answer in one word.', "
                                 "modelParameters => {'max_tokens': 8})").fetchall()
        assert again == answer
        with pytest.raises(Exception, match=r"endpoint 'nope' does not exist; known endpoints: .*sql-chat"):
            con.execute("SELECT ai_query('nope', 'x')").fetchall()
    finally:
        con.close()


@pytest.mark.engine
def test_a_config_update_does_not_stop_the_engine_other_endpoints_share(service, chat_engine):
    service.create({"name": "sharing", "config": local_entity(name="one")})
    service.wait_for_deployments()
    client = InProcessClient(directory_for(service))
    ask = [[{"role": "user", "content": "Say hi."}]]
    assert client.chat("sharing", ask, SamplingOptions(max_tokens=2))[0].error is None
    running = chat_engine._llm
    service.update_config("sharing", local_entity(name="two"))
    service.wait_for_deployments()
    assert client.chat("sharing", ask, SamplingOptions(max_tokens=2))[0].served_entity == "two"
    assert chat_engine._llm is running  # the same vLLM instance: nothing was shut down and restarted


@pytest.mark.engine
def test_mlflow_predict_queries_endpoints(server, admin, monkeypatch, chat_engine, embed_engine):
    from mlflow.deployments import get_deploy_client

    _, token = server.service.auth.create_token("mlflow-predict", is_admin=True)
    monkeypatch.setenv("DATABRICKS_HOST", server.url)
    monkeypatch.setenv("DATABRICKS_TOKEN", token)
    client = get_deploy_client("databricks")
    chat = client.predict(endpoint=CHAT_ENDPOINT, inputs={
        "messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        "max_tokens": 8, "temperature": 0})
    assert "Paris" in chat["choices"][0]["message"]["content"]
    vectors = client.predict(endpoint=EMBED_ENDPOINT, inputs={"input": ["one", "two"]})
    assert [len(d["embedding"]) for d in vectors["data"]] == [384, 384]


@pytest.mark.engine
def test_chat_and_completions_stream_as_server_sent_events(server, admin, openai_client, chat_engine):
    from serving.data.usage import UsageRecorder

    question = [{"role": "user", "content": "Write one sentence about the sea."}]
    whole = openai_client.chat.completions.create(model=CHAT_ENDPOINT, messages=question, max_tokens=24, temperature=0)
    raw = openai_client.chat.completions.with_raw_response.create(
        model=CHAT_ENDPOINT, messages=question, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.headers["served-model-name"] == "smollm2-135m-instruct"
    chunks = list(raw.parse())
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 5  # token by token, not one block
    assert "".join(pieces) == whole.choices[0].message.content  # greedy: the same answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    completion = list(openai_client.completions.create(model=CHAT_ENDPOINT, prompt="The capital of France is",
                                                       max_tokens=8, temperature=0, stream=True))
    assert len(completion) > 3 and "Paris" in "".join(c.choices[0].text for c in completion)

    usage = UsageRecorder(server.service.db).rows(CHAT_ENDPOINT)
    assert any(r["status_code"] == 200 and r["output_tokens"] == whole.usage.completion_tokens for r in usage)


@pytest.mark.engine
def test_a_stream_that_cannot_start_is_an_ordinary_error_and_curl_sees_sse(server, admin, chat_engine):
    import httpx

    _, token = server.service.auth.create_token("curl-user", is_admin=True)
    headers = {"Authorization": f"Bearer {token}"}
    url = f"{server.url}/serving-endpoints/{CHAT_ENDPOINT}/invocations"
    refused = httpx.post(url, headers=headers, json={"messages": [{"role": "user", "content": "hi"}], "n": 2, "stream": True})
    assert refused.status_code == 400 and "cannot be streamed" in refused.json()["message"]

    with httpx.stream("POST", url, headers=headers, timeout=60,
                      json={"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "stream": True}) as events:
        lines = [line for line in events.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert len(lines) > 3
