"""Auth, permissions, secrets and bad input: what the API refuses, and what it never reveals."""

from __future__ import annotations

import copy
import logging
import os
import sqlite3
import stat

import pytest

from tests.registry_helpers import CREATE_EXAMPLE, PLAINTEXT_VALUE, SECRET_VALUE, local_entity, wait_until_settled


@pytest.fixture
def users(server):
    tokens = {name: server.service.auth.create_token(name)[1] for name in ("alice", "bob")}
    server.service.auth.entitle("alice", "create-serving-endpoints")  # bob may not create endpoints
    clients = {name: server.client(token) for name, token in tokens.items()}
    yield clients
    for client in clients.values():
        client.close()


def test_requests_need_a_valid_bearer_token(server):
    with server.client(None) as anonymous:
        response = anonymous.get("/api/2.0/serving-endpoints")
        assert response.status_code == 401
        assert response.json()["error_code"] == "UNAUTHENTICATED" and "Bearer" in response.json()["message"]
    with server.client("sqli_not-a-real-token") as forged:
        response = forged.get("/api/2.0/serving-endpoints")
        assert response.status_code == 401 and response.json()["message"] == "invalid, expired or revoked token"


def test_permissions_creator_manages_others_need_grants(server, users, admin):
    alice, bob = users["alice"], users["bob"]
    created = alice.post("/api/2.0/serving-endpoints", json={"name": "alices", "config": local_entity()}).json()
    endpoint_id = created["id"]
    assert created["permission_level"] == "CAN_MANAGE"

    denied = bob.get("/api/2.0/serving-endpoints/alices")
    assert denied.status_code == 403 and denied.json()["error_code"] == "PERMISSION_DENIED"
    assert "needs CAN_VIEW" in denied.json()["message"]
    assert "alices" not in [e["name"] for e in bob.get("/api/2.0/serving-endpoints").json()["endpoints"]]

    grant = alice.patch(f"/api/2.0/permissions/serving-endpoints/{endpoint_id}",
                        json={"access_control_list": [{"user_name": "bob", "permission_level": "CAN_QUERY"}]})
    assert grant.status_code == 200, grant.text
    acl = {e["user_name"]: e["all_permissions"][0]["permission_level"] for e in grant.json()["access_control_list"]}
    assert acl == {"alice": "CAN_MANAGE", "bob": "CAN_QUERY"}
    assert bob.get("/api/2.0/serving-endpoints/alices").json()["permission_level"] == "CAN_QUERY"

    refused = bob.put("/api/2.0/serving-endpoints/alices/config", json=local_entity())
    assert refused.status_code == 403 and "needs CAN_MANAGE" in refused.json()["message"]
    assert bob.delete("/api/2.0/serving-endpoints/alices").status_code == 403
    assert bob.put(f"/api/2.0/permissions/serving-endpoints/{endpoint_id}",
                   json={"access_control_list": [{"user_name": "bob", "permission_level": "CAN_MANAGE"}]}).status_code == 403
    # admins can do everything
    assert admin.delete("/api/2.0/serving-endpoints/alices").status_code == 200
    # bob sees no scope he may not read (the admin's my_scope)
    assert bob.get("/api/2.0/secrets/scopes/list").json() == {"scopes": []}


def test_secret_values_never_leave_the_server(server, admin, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    body = copy.deepcopy(CREATE_EXAMPLE)
    responses = [admin.post("/api/2.0/serving-endpoints", json=body)]
    plaintext = {"name": "plain", "config": {"served_entities": [{"external_model": {
        "name": "claude-x", "provider": "anthropic", "task": "llm/v1/chat",
        "anthropic_config": {"anthropic_api_key_plaintext": PLAINTEXT_VALUE}}}]}}
    responses.append(admin.post("/api/2.0/serving-endpoints", json=plaintext))
    wait_until_settled(admin, "plain")
    responses += [
        admin.get("/api/2.0/serving-endpoints"),
        admin.get("/api/2.0/serving-endpoints/openai_endpoint"),
        admin.get("/api/2.0/serving-endpoints/plain"),
        admin.get("/api/2.0/secrets/list", params={"scope": "my_scope"}),
        admin.get("/api/2.0/secrets/scopes/list"),
        # errors that concern secret-bearing fields
        admin.post("/api/2.0/secrets/put", json={"scope": "nope", "key": "k", "string_value": SECRET_VALUE}),
        admin.post("/api/2.0/serving-endpoints", json={"name": "bad", "config": {"served_entities": [{"external_model": {
            "name": "m", "provider": "openai", "task": "llm/v1/chat",
            "openai_config": {"openai_api_key": SECRET_VALUE}}}]}}),
        admin.post("/api/2.0/serving-endpoints", json={"name": "bad2", "config": {"served_entities": [{"external_model": {
            "name": "m", "provider": "anthropic", "task": "llm/v1/chat",
            "anthropic_config": {"anthropic_api_key_plaintext": 4242424242}}}]}}),
    ]
    assert [r.status_code for r in responses[:7]] == [200] * 7
    assert [r.status_code for r in responses[7:]] == [404, 400, 400]
    assert {"key": "my_openai_api_key"}.items() <= responses[5].json()["secrets"][0].items()
    for response in responses:
        assert SECRET_VALUE not in response.text and PLAINTEXT_VALUE not in response.text
        assert "4242424242" not in response.text
    plain_entity = responses[4].json()["config"]["served_entities"][0]
    assert plain_entity["external_model"]["anthropic_config"] == {}
    logs = caplog.text + "".join(capfd.readouterr())
    assert SECRET_VALUE not in logs and PLAINTEXT_VALUE not in logs
    # encrypted at rest: the raw database file holds neither value
    raw = server.service.db.path.read_bytes()
    for wal in server.service.db.path.parent.glob("registry.db-wal"):
        raw += wal.read_bytes()
    assert SECRET_VALUE.encode() not in raw and PLAINTEXT_VALUE.encode() not in raw
    key_file = server.service.home / "secret.key"
    if "SQLINFER_SECRET_KEY" not in os.environ:
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # and the reference resolves to the value only for a call
    assert server.service.secrets.resolve("{{secrets/my_scope/my_openai_api_key}}") == SECRET_VALUE


def test_secrets_api_round_trip(admin):
    assert admin.post("/api/2.0/secrets/scopes/create", json={"scope": "my_scope"}).status_code == 409
    assert admin.post("/api/2.0/secrets/put", json={"scope": "my_scope", "key": "other", "string_value": "v"}).status_code == 200
    keys = [s["key"] for s in admin.get("/api/2.0/secrets/list", params={"scope": "my_scope"}).json()["secrets"]]
    assert keys == ["my_openai_api_key", "other"]
    assert admin.post("/api/2.0/secrets/delete", json={"scope": "my_scope", "key": "other"}).status_code == 200
    missing = admin.post("/api/2.0/secrets/delete", json={"scope": "my_scope", "key": "other"})
    assert missing.status_code == 404 and "'other'" in missing.json()["message"]
    assert admin.post("/api/2.0/secrets/scopes/delete", json={"scope": "my_scope"}).status_code == 200
    assert admin.get("/api/2.0/secrets/scopes/list").json() == {"scopes": []}


def external(provider="openai", task="llm/v1/chat", **config) -> dict:
    configs = {"openai": {"openai_config": {"openai_api_key": "{{secrets/my_scope/my_openai_api_key}}"}},
               "anthropic": {"anthropic_config": {"anthropic_api_key_plaintext": "x"}},
               "custom": {"custom_provider_config": {"custom_provider_url": "http://127.0.0.1:1"}}}
    return {"name": "m1", "provider": provider, "task": task, **(config or configs.get(provider, {}))}


BAD_REQUESTS = [
    # (what, method, path, body, status, error_code, message fragment)
    ("malformed JSON", "POST", "", b"{not json", 400, "MALFORMED_REQUEST", "not valid JSON"),
    ("unknown field", "POST", "", {"name": "x", "config": local_entity(), "colour": "red"}, 400,
     "INVALID_PARAMETER_VALUE", "colour: unknown field 'colour'"),
    ("unknown nested field", "POST", "", {"name": "x", "config": {"served_entities": [{"entity_name": "smollm2-135m-instruct", "gpu": 1}]}},
     400, "INVALID_PARAMETER_VALUE", "config.served_entities[0].gpu: unknown field 'gpu'"),
    ("missing name", "POST", "", {"config": local_entity()}, 400, "INVALID_PARAMETER_VALUE", "name: is required"),
    ("bad name characters", "POST", "", {"name": "my endpoint!", "config": local_entity()}, 400,
     "INVALID_PARAMETER_VALUE", "may use only letters, digits"),
    ("unknown provider", "POST", "", {"name": "x", "config": {"served_entities": [{"external_model": external("cohere", cohere_config={})}]}},
     400, "INVALID_PARAMETER_VALUE", "provider 'cohere' is not supported; valid providers: openai, anthropic, custom"),
    ("task the provider does not serve", "POST", "", {"name": "x", "config": {"served_entities": [{"external_model": external("anthropic", "llm/v1/embeddings")}]}},
     400, "INVALID_PARAMETER_VALUE", "provider 'anthropic' does not serve task 'llm/v1/embeddings'"),
    ("traffic not summing to 100", "POST", "", {"name": "x", "config": {
        "served_entities": [{"entity_name": "smollm2-135m-instruct", "name": "a"}, {"entity_name": "smollm2-135m-instruct", "name": "b"}],
        "traffic_config": {"routes": [{"served_model_name": "a", "traffic_percentage": 60}, {"served_model_name": "b", "traffic_percentage": 30}]}}},
     400, "INVALID_PARAMETER_VALUE", "percentages must sum to 100, got 90"),
    ("an external entity next to a local one", "POST", "", {"name": "x", "config": {"served_entities": [
        {"external_model": external(), "name": "a"}, {"entity_name": "smollm2-135m-instruct", "name": "b"}],
        "traffic_config": {"routes": [{"served_model_name": "a", "traffic_percentage": 50}, {"served_model_name": "b", "traffic_percentage": 50}]}}},
     400, "INVALID_PARAMETER_VALUE", "external models cannot share an endpoint with local or MLflow models"),
    ("external entities of two tasks", "POST", "", {"name": "x", "config": {"served_entities": [
        {"external_model": external(), "name": "a"}, {"external_model": external("openai", "llm/v1/embeddings"), "name": "b"}],
        "traffic_config": {"routes": [{"served_model_name": "a", "traffic_percentage": 50}, {"served_model_name": "b", "traffic_percentage": 50}]}}},
     400, "INVALID_PARAMETER_VALUE", "must serve one task, got llm/v1/chat, llm/v1/embeddings"),
    ("more than 10 entities", "POST", "", {"name": "x", "config": {"served_entities": [
        {"entity_name": "smollm2-135m-instruct", "name": f"e{i}"} for i in range(11)]}},
     400, "INVALID_PARAMETER_VALUE", "at most 10 served entities"),
    ("missing secret scope", "POST", "", {"name": "x", "config": {"served_entities": [{"external_model": external(
        openai_config={"openai_api_key": "{{secrets/nope/key}}"})}]}},
     404, "RESOURCE_DOES_NOT_EXIST", "refers to {{secrets/nope/key}}, but secret scope 'nope' does not exist"),
    ("missing secret key", "POST", "", {"name": "x", "config": {"served_entities": [{"external_model": external(
        openai_config={"openai_api_key": "{{secrets/my_scope/missing}}"})}]}},
     404, "RESOURCE_DOES_NOT_EXIST", "scope 'my_scope' has no key 'missing'"),
    ("environment_vars, which shared engines cannot apply", "POST", "", {"name": "x", "config": local_entity(
        environment_vars={"HF_TOKEN": "{{secrets/my_scope/hf}}"})},
     501, "NOT_IMPLEMENTED", "config.served_entities[0].environment_vars: sqlinfer's engines are shared per model"),
    ("unknown local model", "POST", "", {"name": "x", "config": local_entity("gpt-9")}, 404,
     "RESOURCE_DOES_NOT_EXIST", "entity_name 'gpt-9' is not a bundled model"),
    ("duplicate endpoint name", "POST", "", {"name": "existing", "config": local_entity()}, 409,
     "RESOURCE_ALREADY_EXISTS", "endpoint 'existing' already exists"),
    ("update of a missing endpoint", "PUT", "/missing/config", local_entity(), 404,
     "RESOURCE_DOES_NOT_EXIST", "endpoint 'missing' does not exist"),
    ("switching external to local", "PUT", "/openai_endpoint/config", local_entity(), 400,
     "INVALID_PARAMETER_VALUE", "cannot be switched to non-external"),
    ("switching local to external", "PUT", "/existing/config", {"served_entities": [{"external_model": external()}]}, 400,
     "INVALID_PARAMETER_VALUE", "cannot be switched to external"),
    ("reserved system name", "POST", "", {"name": "system-mine", "config": local_entity()}, 400,
     "INVALID_PARAMETER_VALUE", "is reserved"),
    ("tags on a missing endpoint", "PATCH", "/missing/tags", {"add_tags": [{"key": "a"}]}, 404,
     "RESOURCE_DOES_NOT_EXIST", "endpoint 'missing' does not exist"),
]


def registry_snapshot(service) -> dict:
    con = sqlite3.connect(service.db.path)
    try:
        return {table: con.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
                for table in ("endpoints", "endpoint_config_history", "endpoint_tags", "permissions", "secrets", "secret_scopes")}
    finally:
        con.close()


@pytest.mark.parametrize("what, method, path, body, status, code, fragment", BAD_REQUESTS, ids=[r[0] for r in BAD_REQUESTS])
def test_bad_input_is_refused_clearly_and_changes_nothing(server, admin, what, method, path, body, status, code, fragment):
    admin.post("/api/2.0/serving-endpoints", json={"name": "existing", "config": local_entity()}).raise_for_status()
    admin.post("/api/2.0/serving-endpoints", json=CREATE_EXAMPLE).raise_for_status()
    server.service.wait_for_deployments()
    before = registry_snapshot(server.service)
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    response = admin.request(method, "/api/2.0/serving-endpoints" + path, **kwargs)
    assert response.status_code == status, response.text
    assert response.json()["error_code"] == code
    assert fragment in response.json()["message"]
    server.service.wait_for_deployments()
    assert registry_snapshot(server.service) == before
