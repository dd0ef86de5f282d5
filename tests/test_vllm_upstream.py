"""vLLM's own OpenAI-compatible server as the external provider: a real server nobody here wrote."""

from __future__ import annotations

import pytest

from connectors.duckdb import connect
from serving.client import InProcessClient
from serving.registry import registry_for

pytestmark = pytest.mark.engine

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

    con = connect(client=InProcessClient(registry_for(server.service)))
    try:
        rows = con.execute(f"SELECT ai_query('{name}', q, modelParameters => {{'max_tokens': 8}}) "
                           f"FROM (VALUES ('{QUESTION}'), (NULL)) t(q)").fetchall()
    finally:
        con.close()
    assert "Paris" in rows[0][0] and rows[1][0] is None

    from openai import OpenAI

    _, token = server.service.auth.create_token(f"sdk-{provider}", is_admin=True)
    sdk = OpenAI(base_url=f"{server.url}/serving-endpoints", api_key=token, max_retries=0)
    reply = sdk.chat.completions.create(model=name, messages=[{"role": "user", "content": QUESTION}], max_tokens=8, temperature=0)
    assert "Paris" in reply.choices[0].message.content and reply.usage.prompt_tokens > 0
