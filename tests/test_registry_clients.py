"""Real clients against the registry: the MLflow deployments client, and the CLI + `sqlinfer serve`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.registry_helpers import SQLINFER
from tests.rest_server import free_port, wait_healthy
from tests.registry_helpers import CREATE_EXAMPLE, SECRET_VALUE, local_entity



@pytest.fixture
def mlflow_client(server, admin, monkeypatch):
    from mlflow.deployments import get_deploy_client

    _, token = server.service.auth.create_token("mlflow-user@example.com", is_admin=True)
    monkeypatch.setenv("DATABRICKS_HOST", server.url)
    monkeypatch.setenv("DATABRICKS_TOKEN", token)
    return get_deploy_client("databricks")


def test_the_mlflow_deployments_client_works_unchanged(mlflow_client, server, gate):
    created = mlflow_client.create_endpoint(config=CREATE_EXAMPLE)
    assert created["name"] == "openai_endpoint"
    server.service.wait_for_deployments()
    endpoint = mlflow_client.get_endpoint("openai_endpoint")
    assert endpoint["state"] == {"ready": "READY", "config_update": "NOT_UPDATING"}
    assert endpoint["config"]["served_entities"][0]["external_model"]["openai_config"]["openai_api_key"] == \
        "{{secrets/my_scope/my_openai_api_key}}"
    assert "openai_endpoint" in [e["name"] for e in mlflow_client.list_endpoints()]

    mlflow_client.create_endpoint(config={"name": "local-chat", "config": local_entity(workload_type="CPU"),
                                          "description": "via mlflow", "budget_policy_id": "bp-7"})
    server.service.wait_for_deployments()
    read = mlflow_client.get_endpoint("local-chat")  # every field it set, read back unchanged
    assert read["description"] == "via mlflow" and read["budget_policy_id"] == "bp-7"
    assert read["config"]["served_entities"][0]["workload_type"] == "CPU"
    gate.clear()  # hold the deployment: the update must answer while the old config still serves
    updated = mlflow_client.update_endpoint_config("local-chat", config=local_entity(name="second"))
    assert updated["pending_config"]["config_version"] == 2 and updated["config"]["config_version"] == 1
    gate.set()
    server.service.wait_for_deployments()
    assert mlflow_client.get_endpoint("local-chat")["config"]["served_entities"][0]["name"] == "second"

    tags = mlflow_client.update_endpoint_tags("local-chat", config={"add_tags": [{"key": "team", "value": "ml"}]})
    assert tags["tags"] == [{"key": "team", "value": "ml"}]
    limits = mlflow_client.update_endpoint_rate_limits(
        "local-chat", config={"rate_limits": [{"calls": 20, "key": "endpoint", "renewal_period": "minute"}]})
    assert limits["rate_limits"][0]["calls"] == 20
    gateway = mlflow_client.update_endpoint_ai_gateway("local-chat", config={"usage_tracking_config": {"enabled": True}})
    assert gateway["usage_tracking_config"] == {"enabled": True}

    mlflow_client.delete_endpoint("local-chat")
    assert "local-chat" not in [e["name"] for e in mlflow_client.list_endpoints()]
    from mlflow.exceptions import MlflowException
    from requests import HTTPError

    with pytest.raises((MlflowException, HTTPError), match="endpoint 'local-chat' does not exist"):
        mlflow_client.get_endpoint("local-chat")


def run_cli(home: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = os.environ.copy() | {"SQLINFER_HOME": str(home)}
    return subprocess.run([SQLINFER, *args], capture_output=True, text=True, input=stdin, env=env, timeout=120)


def test_a_newcomer_serves_creates_a_token_and_manages_endpoints(tmp_path):
    home = tmp_path / "home"
    token = run_cli(home, "tokens", "create", "--user", "newcomer", "--admin")
    assert token.returncode == 0, token.stderr
    token_value = token.stdout.strip()
    assert token_value.startswith("sqli_") and "shown only once" in token.stderr

    assert run_cli(home, "secrets", "create-scope", "my_scope").returncode == 0
    assert run_cli(home, "secrets", "put", "my_scope", "my_openai_api_key", stdin=SECRET_VALUE + "\n").returncode == 0
    listed = run_cli(home, "secrets", "list", "my_scope")
    assert "my_openai_api_key" in listed.stdout and SECRET_VALUE not in listed.stdout

    config = tmp_path / "endpoint.json"
    config.write_text(json.dumps(CREATE_EXAMPLE))
    created = run_cli(home, "endpoints", "create", "-f", str(config))
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["state"]["ready"] == "READY"
    assert SECRET_VALUE not in created.stdout

    duplicate = run_cli(home, "endpoints", "create", "-f", str(config))
    assert duplicate.returncode == 1
    assert "error: RESOURCE_ALREADY_EXISTS: endpoint 'openai_endpoint' already exists" in duplicate.stderr

    port = free_port()
    env = os.environ.copy() | {"SQLINFER_HOME": str(home)}
    server = subprocess.Popen([SQLINFER, "serve", "--port", str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(f"{base}/health")
        headers = {"Authorization": f"Bearer {token_value}"}
        names = [e["name"] for e in httpx.get(f"{base}/api/2.0/serving-endpoints", headers=headers).json()["endpoints"]]
        assert "openai_endpoint" in names
        update = httpx.put(f"{base}/api/2.0/serving-endpoints/openai_endpoint/config", headers=headers,
                           json={"served_entities": [{"external_model": {
                               "name": "text-embedding-3-small", "provider": "openai", "task": "llm/v1/embeddings",
                               "openai_config": {"openai_api_key": "{{secrets/my_scope/my_openai_api_key}}"}}}]})
        assert update.status_code == 200, update.text
    finally:
        server.terminate()
        log = server.communicate(timeout=30)[0]
    assert SECRET_VALUE not in log
    got = run_cli(home, "endpoints", "get", "openai_endpoint")
    assert json.loads(got.stdout)["config"]["served_entities"][0]["name"] == "text-embedding-3-small"
    assert run_cli(home, "endpoints", "delete", "openai_endpoint").returncode == 0
