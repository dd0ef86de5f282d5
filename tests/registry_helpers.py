"""Shared request bodies and helpers for the registry tests."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
import sys
import time
from pathlib import Path

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


# The installed console script, as a user runs it.
SQLINFER = shutil.which("sqlinfer", path=str(Path(sys.executable).parent)) or "sqlinfer"


def external_endpoint(name: str, upstream_url: str, **extra) -> dict:
    """A create body for one external chat model on an OpenAI-compatible ``custom`` provider."""
    return {"name": name, "config": {"served_entities": [{"external_model": {
        "name": "model-x", "provider": "custom", "task": "llm/v1/chat",
        "custom_provider_config": {"custom_provider_url": upstream_url}}}]}, **extra}


@contextmanager
def duckdb_on(name: str, backend, task: str = "llm/v1/chat"):
    """A DuckDB connection whose functions reach ``backend`` registered in memory as ``name``."""
    from connectors.duckdb import connect
    from serving.data.client import InProcessClient
    from serving.data.directory import EndpointDirectory

    registry = EndpointDirectory()
    registry.register(name, task, backend)
    con = connect(client=InProcessClient(registry))
    try:
        yield con
    finally:
        con.close()


def sql_rows(service, query: str) -> list[tuple]:
    """``query``'s rows in DuckDB, its AI functions served by ``service``'s endpoints in process."""
    from connectors.duckdb import connect
    from serving.data.client import InProcessClient
    from serving.data.directory import directory_for

    con = connect(client=InProcessClient(directory_for(service)))
    try:
        return con.execute(query).fetchall()
    finally:
        con.close()
