"""vLLM's own OpenAI-compatible server as the external provider: a real server nobody here wrote."""

from __future__ import annotations

import pytest

from tests.registry_helpers import sql_rows

# vLLM's own OpenAI server as the provider: about 3.5 minutes on 2 cores, in `make test-slow` (CI runs it)
pytestmark = [pytest.mark.engine, pytest.mark.slow]

QUESTION = "What is the capital of France? Answer in one word."


@pytest.mark.parametrize("provider", ["openai", "custom"])
def test_an_external_endpoint_on_vllm_answers_ai_query_and_the_openai_sdk(provider, vllm_openai_server, server, admin):
    base = f"{vllm_openai_server}/v1"
    config = ({"openai_config": {"openai_api_key_plaintext": "not-checked-by-vllm", "openai_api_base": base}}
              if provider == "openai" else {"custom_provider_config": {"custom_provider_url": base}})
    name = f"vllm-{provider}"
    admin.post("/api/2.0/serving-endpoints", json={"name": name, "config": {"served_entities": [{"external_model": {
        "name": "smollm2", "provider": provider, "task": "llm/v1/chat", **config}}]}}).raise_for_status()
    server.service.wait_for_deployments()

    rows = sql_rows(server.service, f"SELECT ai_query('{name}', q, modelParameters => {{'max_tokens': 8}}) "
                                    f"FROM (VALUES ('{QUESTION}'), (NULL)) t(q)")
    assert "Paris" in rows[0][0] and rows[1][0] is None

    from openai import OpenAI

    _, token = server.service.auth.create_token(f"sdk-{provider}", is_admin=True)
    sdk = OpenAI(base_url=f"{server.url}/serving-endpoints", api_key=token, max_retries=0)
    reply = sdk.chat.completions.create(model=name, messages=[{"role": "user", "content": QUESTION}], max_tokens=8, temperature=0)
    assert "Paris" in reply.choices[0].message.content and reply.usage.prompt_tokens > 0


def test_streaming_through_an_external_provider_comes_token_by_token(vllm_openai_server, server, admin):
    admin.post("/api/2.0/serving-endpoints", json={"name": "vllm-stream", "config": {"served_entities": [{"external_model": {
        "name": "smollm2", "provider": "custom", "task": "llm/v1/chat",
        "custom_provider_config": {"custom_provider_url": f"{vllm_openai_server}/v1"}}}]}}).raise_for_status()
    server.service.wait_for_deployments()
    from openai import OpenAI

    _, token = server.service.auth.create_token("sdk-stream", is_admin=True)
    sdk = OpenAI(base_url=f"{server.url}/serving-endpoints", api_key=token, max_retries=0)
    question = [{"role": "user", "content": "Name three colours."}]
    whole = sdk.chat.completions.create(model="vllm-stream", messages=question, max_tokens=16, temperature=0)
    chunks = list(sdk.chat.completions.create(model="vllm-stream", messages=question, max_tokens=16, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3  # incremental, not one block
    assert "".join(pieces) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
