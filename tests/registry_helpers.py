"""Shared request bodies and helpers for the registry tests."""

from __future__ import annotations

import time

SECRET_VALUE = "sk-test-DO-NOT-LEAK-4242"
PLAINTEXT_VALUE = "plain-DO-NOT-LEAK-7777"

CREATE_EXAMPLE = {  # api-reference.md, verbatim
    "name": "openai_endpoint",
    "config": {"served_entities": [{
        "name": "openai_embeddings",
        "external_model": {"name": "text-embedding-ada-002", "provider": "openai", "task": "llm/v1/embeddings",
                           "openai_config": {"openai_api_key": "{{secrets/my_scope/my_openai_api_key}}"}}}]},
    "rate_limits": [{"calls": 100, "key": "user", "renewal_period": "minute"}],
    "tags": [{"key": "team", "value": "gen-ai"}],
}


def local_entity(entity_name: str = "smollm2-135m-instruct", **extra) -> dict:
    return {"served_entities": [{"entity_name": entity_name, **extra}]}


def wait_until_settled(client, name: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        endpoint = client.get(f"/api/2.0/serving-endpoints/{name}").json()
        if endpoint["state"]["config_update"] != "IN_PROGRESS" or time.monotonic() > deadline:
            return endpoint
        time.sleep(0.05)
