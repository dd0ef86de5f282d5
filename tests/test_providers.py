"""External providers: retries, Retry-After, fail-fast 4xx, timeouts, and secrets — against real servers."""

from __future__ import annotations

import time


from connectors.duckdb import connect
from engine.types import SamplingOptions
from serving.data.client import InProcessClient
from serving.data.providers import OpenAICompatibleBackend, RetryPolicy
from serving.data.directory import directory_for

KEY = "sk-provider-key-DO-NOT-LEAK-31337"
ASK = [[{"role": "user", "content": "hello there"}]]
FAST = SamplingOptions(max_tokens=4)




def backend(upstream, **kwargs) -> OpenAICompatibleBackend:
    kwargs.setdefault("retry", RetryPolicy(max_attempts=4, base_delay=0.05, max_delay=0.2))
    return OpenAICompatibleBackend("llm/v1/chat", "model-x", upstream.url, lambda: KEY, **kwargs)


def test_429_is_retried_after_the_time_retry_after_asks(upstream):
    upstream.faults.append(("status", 429, {"Retry-After": "1"}))
    started = time.monotonic()
    [result] = backend(upstream).chat(ASK, FAST)
    assert result.error is None and result.text == "hello there"
    assert time.monotonic() - started >= 1.0 and len(upstream.calls) == 2


def test_5xx_dropped_connections_and_timeouts_are_retried(upstream):
    upstream.faults.extend([("status", 500), ("drop",), ("slow", 2.0), ("status", 503)])
    [result] = backend(upstream, timeout=0.5, retry=RetryPolicy(max_attempts=6, base_delay=0.05, max_delay=0.2)).chat(ASK, FAST)
    assert result.error is None and result.text == "hello there"
    assert len(upstream.calls) == 5


def test_other_4xx_fail_at_once_with_the_providers_message_and_no_key(upstream):
    upstream.faults.append(("status", 400))
    [result] = backend(upstream).chat(ASK, FAST)
    assert len(upstream.calls) == 1
    assert "provider answered HTTP 400: scripted failure 400" in result.error
    assert KEY not in result.error and "[REDACTED]" in result.error


def test_retries_give_up_and_fail_only_their_row(upstream):
    upstream.faults.extend([("status", 500)] * 4)
    results = backend(upstream, max_concurrency=1).chat(ASK + [[{"role": "user", "content": "second"}]], FAST)
    assert "gave up after 4 attempts" in results[0].error and KEY not in results[0].error
    assert results[1].text == "second"


def test_embeddings_go_in_chunks(upstream):
    embedder = OpenAICompatibleBackend("llm/v1/embeddings", "emb", upstream.url, lambda: KEY, embedding_chunk=4)
    results = embedder.embed([f"t{'x' * i}" for i in range(10)])
    assert [r.vector[0] for r in results] == [float(1 + i) for i in range(10)]
    assert len(upstream.calls) == 3


def test_a_custom_provider_endpoint_serves_ai_query_with_its_secret_resolved_at_call_time(upstream, service):
    service.secrets.create_scope("providers")
    service.secrets.put("providers", "upstream", KEY)
    service.create({"name": "custom-chat", "config": {"served_entities": [{"external_model": {
        "name": "model-x", "provider": "custom", "task": "llm/v1/chat",
        "custom_provider_config": {"custom_provider_url": upstream.url,
                                   "bearer_token_auth": {"token": "{{secrets/providers/upstream}}"}}}}]}})
    service.wait_for_deployments()
    assert upstream.calls == []  # nothing is called, nor the secret read for a call, before a query
    con = connect(client=InProcessClient(directory_for(service)))
    try:
        rows = con.execute("SELECT ai_query('custom-chat', r) FROM (VALUES ('one'), ('two'), ('one')) t(r)").fetchall()
    finally:
        con.close()
    assert rows == [("one",), ("two",), ("one",)]
    assert len(upstream.calls) == 2  # the duplicate was sent once
    assert {auth for _, _, auth in upstream.calls} == {f"Bearer {KEY}"}
    assert {body["max_tokens"] for _, body, _ in upstream.calls} == {256}  # ai_query's default


def test_an_openai_endpoint_with_a_plaintext_key_answers_invocations(upstream, server, admin):
    created = admin.post("/api/2.0/serving-endpoints", json={"name": "oa", "config": {"served_entities": [{"external_model": {
        "name": "gpt-x", "provider": "openai", "task": "llm/v1/chat",
        "openai_config": {"openai_api_key_plaintext": KEY, "openai_api_base": upstream.url}}}]}})
    assert created.status_code == 200 and KEY not in created.text
    server.service.wait_for_deployments()
    response = admin.post("/serving-endpoints/oa/invocations", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "hi"
    assert response.headers["served-model-name"] == "gpt-x"
    assert upstream.calls[-1][2] == f"Bearer {KEY}" and upstream.calls[-1][1]["model"] == "gpt-x"


def test_an_anthropic_endpoint_answers_through_the_messages_api(upstream, server, admin, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_BASE_URL", upstream.url.removesuffix("/v1"))
    monkeypatch.setenv("SQLINFER_PROVIDER_BASE_DELAY", "0.01")
    admin.post("/api/2.0/serving-endpoints", json={"name": "claude", "config": {"served_entities": [{"external_model": {
        "name": "claude-x", "provider": "anthropic", "task": "llm/v1/chat",
        "anthropic_config": {"anthropic_api_key_plaintext": KEY}}}]}}).raise_for_status()
    server.service.wait_for_deployments()
    upstream.faults.append(("status", 529))  # Anthropic's "overloaded": retried like any 5xx
    response = admin.post("/serving-endpoints/claude/invocations", json={"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "bonjour"}], "max_tokens": 5})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "bonjour"
    assert response.json()["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    path, body, key = upstream.calls[-1]
    assert path == "/v1/messages" and KEY in key  # sent the way the official SDK sends it
    assert body["system"] == "Be brief." and body["max_tokens"] == 5
    assert len(upstream.calls) == 2


def test_streams_retry_until_they_open_and_rate_limits_refuse_extra_streams(upstream, server, admin, monkeypatch):
    from openai import OpenAI, RateLimitError

    monkeypatch.setenv("SQLINFER_PROVIDER_BASE_DELAY", "0.05")
    admin.post("/api/2.0/serving-endpoints", json={"name": "streamy", "config": {"served_entities": [{"external_model": {
        "name": "model-x", "provider": "custom", "task": "llm/v1/chat",
        "custom_provider_config": {"custom_provider_url": upstream.url}}}]},
        "rate_limits": [{"calls": 2, "key": "endpoint", "renewal_period": "minute"}]}).raise_for_status()
    server.service.wait_for_deployments()
    _, token = server.service.auth.create_token("streamer", is_admin=True)
    sdk = OpenAI(base_url=f"{server.url}/serving-endpoints", api_key=token, max_retries=0)

    from tests.test_rate_limits import start_of_a_window

    start_of_a_window()
    upstream.faults.append(("status", 429, {"Retry-After": "0.2"}))
    started = time.monotonic()
    chunks = list(sdk.chat.completions.create(model="streamy", messages=[{"role": "user", "content": "one two three four"}],
                                              stream=True, stream_options={"include_usage": True}))
    assert time.monotonic() - started >= 0.2  # the provider's Retry-After was honoured before the stream opened
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert pieces == ["one", " two", " three", " four"]
    assert chunks[-1].usage.completion_tokens == 2 and chunks[-1].usage.prompt_tokens == 3

    list(sdk.chat.completions.create(model="streamy", messages=[{"role": "user", "content": "again"}], stream=True))
    try:
        list(sdk.chat.completions.create(model="streamy", messages=[{"role": "user", "content": "third"}], stream=True))
        raise AssertionError("a third stream in one minute should be refused")
    except RateLimitError as refused:
        assert refused.response.headers.get("retry-after") is not None
        assert "rate limit" in str(refused)
