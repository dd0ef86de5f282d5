"""The security model, attacked as an ordinary user would: bob holds a normal token.

A config may only use secrets its author may READ (checked on create, on update, at deployment
and whenever a key is resolved for a call); creating endpoints is an entitlement; the egress
allow-list bounds where keys may go; errors never tell bob whether a scope he may not read exists.
Every exploit test runs against a real loopback listener that must receive no key.
"""

from __future__ import annotations

import pytest

from tests.fake_providers import ScriptedOpenAIServer
from tests.registry_helpers import wait_until_settled

ADMIN_KEY = "sk-admin-DO-NOT-LEAK-9191"


@pytest.fixture
def bob(server, admin):
    """bob: an ordinary user who may create endpoints; the admin keeps a provider key in adminscope."""
    admin.post("/api/2.0/secrets/scopes/create", json={"scope": "adminscope"}).raise_for_status()
    admin.post("/api/2.0/secrets/put", json={"scope": "adminscope", "key": "openai", "string_value": ADMIN_KEY}).raise_for_status()
    server.service.auth.entitle("bob", "create-serving-endpoints")
    with server.client(server.service.auth.create_token("bob")[1]) as client:
        yield client


@pytest.fixture
def listener():
    """bob's own server on 127.0.0.1: it records every Authorization header it receives."""
    server = ScriptedOpenAIServer()
    yield server
    server.stop()


def openai_endpoint(name: str, base: str, key: str = "{{secrets/adminscope/openai}}") -> dict:
    return {"name": name, "config": {"served_entities": [{"external_model": {
        "name": "gpt-x", "provider": "openai", "task": "llm/v1/chat",
        "openai_config": {"openai_api_key": key, "openai_api_base": base}}}]}}


def custom_endpoint(name: str, url: str) -> dict:
    return {"name": name, "config": {"served_entities": [{"external_model": {
        "name": "m", "provider": "custom", "task": "llm/v1/chat",
        "custom_provider_config": {"custom_provider_url": url,
                                   "bearer_token_auth": {"token": "{{secrets/adminscope/openai}}"}}}}]}}


def keys_received(listener) -> list[str | None]:
    return [authorization for _, _, authorization in listener.calls]


def test_bob_cannot_point_an_admins_key_at_his_own_server(server, bob, listener):
    for body in (openai_endpoint("steal", listener.url), custom_endpoint("steal2", listener.url)):
        refused = bob.post("/api/2.0/serving-endpoints", json=body)
        assert refused.status_code == 404, refused.text
        assert refused.json()["error_code"] == "RESOURCE_DOES_NOT_EXIST"
        assert "secret scope 'adminscope' does not exist or user 'bob' may not READ it" in refused.json()["message"]
        assert bob.get(f"/api/2.0/serving-endpoints/{body['name']}").status_code == 404  # nothing was stored
    query = {"messages": [{"role": "user", "content": "hi"}]}
    assert bob.post("/serving-endpoints/steal/invocations", json=query).status_code == 404
    assert ADMIN_KEY not in str(keys_received(listener)) and listener.calls == []


def test_an_error_does_not_tell_whether_a_scope_bob_may_not_read_exists(bob, listener):
    exists = bob.post("/api/2.0/serving-endpoints", json=openai_endpoint("a", listener.url)).json()
    missing = bob.post("/api/2.0/serving-endpoints",
                       json=openai_endpoint("b", listener.url, "{{secrets/nosuchscope/openai}}")).json()
    assert exists["error_code"] == missing["error_code"]
    assert exists["message"].replace("adminscope", "S") == missing["message"].replace("nosuchscope", "S")
    missing_key = bob.post("/api/2.0/serving-endpoints",
                           json=openai_endpoint("c", listener.url, "{{secrets/adminscope/nokey}}")).json()
    assert "nokey" not in missing_key["message"].replace("{{secrets/adminscope/nokey}}", "")  # no word of the key
    for scope in ("adminscope", "nosuchscope"):
        listed = bob.get("/api/2.0/secrets/list", params={"scope": scope})
        assert listed.status_code == 404 and f"secret scope '{scope}' does not exist, or user 'bob' has no permission" \
            in listed.json()["message"]


def test_a_manager_without_read_cannot_redirect_an_admins_endpoint(server, admin, bob, listener):
    upstream = ScriptedOpenAIServer()
    try:
        admin.post("/api/2.0/serving-endpoints", json=openai_endpoint("team", upstream.url)).raise_for_status()
        endpoint = wait_until_settled(admin, "team")
        admin.patch(f"/api/2.0/permissions/serving-endpoints/{endpoint['id']}",
                    json={"access_control_list": [{"user_name": "bob", "permission_level": "CAN_MANAGE"}]}).raise_for_status()
        redirected = bob.put("/api/2.0/serving-endpoints/team/config", json=openai_endpoint("team", listener.url)["config"])
        assert redirected.status_code == 404 and "may not READ it" in redirected.json()["message"]
        answer = bob.post("/serving-endpoints/team/invocations", json={"messages": [{"role": "user", "content": "hi"}]})
        assert answer.status_code == 200, answer.text  # querying with the admin's key is what CAN_QUERY grants
        assert keys_received(upstream) == [f"Bearer {ADMIN_KEY}"] and listener.calls == []
    finally:
        upstream.stop()


def test_granting_and_revoking_read_takes_effect(server, admin, bob, listener):
    admin.post("/api/2.0/secrets/acls/put", json={"scope": "adminscope", "principal": "bob", "permission": "READ"}).raise_for_status()
    assert admin.get("/api/2.0/secrets/acls/get", params={"scope": "adminscope", "principal": "bob"}).json() == \
        {"principal": "bob", "permission": "READ"}
    created = bob.post("/api/2.0/serving-endpoints", json=openai_endpoint("mine", listener.url))
    assert created.status_code == 200, created.text
    wait_until_settled(bob, "mine")
    query = {"messages": [{"role": "user", "content": "hi"}]}
    assert bob.post("/serving-endpoints/mine/invocations", json=query).status_code == 200
    assert keys_received(listener) == [f"Bearer {ADMIN_KEY}"]  # granted: bob may use what he may read

    admin.post("/api/2.0/secrets/acls/delete", json={"scope": "adminscope", "principal": "bob"}).raise_for_status()
    after = bob.post("/serving-endpoints/mine/invocations", json=query)
    assert after.status_code == 404 and "may not READ it" in after.text
    assert len(listener.calls) == 1  # the revoked key was never sent again
    items = admin.get("/api/2.0/secrets/acls/list", params={"scope": "adminscope"}).json()["items"]
    assert items == [{"principal": "admin@example.com", "permission": "MANAGE"}]


def test_scope_acls_follow_databricks_levels(server, admin, bob):
    with server.client(server.service.auth.create_token("carol")[1]) as carol:
        assert bob.post("/api/2.0/secrets/scopes/create", json={"scope": "bobs"}).status_code == 200  # any user; bob: MANAGE
        bob.post("/api/2.0/secrets/put", json={"scope": "bobs", "key": "k", "string_value": "v"}).raise_for_status()
        assert carol.get("/api/2.0/secrets/list", params={"scope": "bobs"}).status_code == 404
        bob.post("/api/2.0/secrets/acls/put", json={"scope": "bobs", "principal": "carol", "permission": "READ"}).raise_for_status()
        assert [s["key"] for s in carol.get("/api/2.0/secrets/list", params={"scope": "bobs"}).json()["secrets"]] == ["k"]
        refused = carol.post("/api/2.0/secrets/put", json={"scope": "bobs", "key": "k", "string_value": "x"})
        assert refused.status_code == 403 and "needs WRITE on secret scope 'bobs' (has READ)" in refused.json()["message"]
        assert carol.post("/api/2.0/secrets/acls/put", json={"scope": "bobs", "principal": "carol",
                                                             "permission": "MANAGE"}).status_code == 403
        bob.post("/api/2.0/secrets/acls/put", json={"scope": "bobs", "principal": "users", "permission": "WRITE"}).raise_for_status()
        assert carol.post("/api/2.0/secrets/put", json={"scope": "bobs", "key": "k2", "string_value": "x"}).status_code == 200
        assert [s["name"] for s in carol.get("/api/2.0/secrets/scopes/list").json()["scopes"]] == ["bobs"]


def test_creating_endpoints_is_an_entitlement(server, admin):
    with server.client(server.service.auth.create_token("dave")[1]) as dave:
        body = {"name": "daves", "config": {"served_entities": [{"entity_name": "smollm2-135m-instruct"}]}}
        refused = dave.post("/api/2.0/serving-endpoints", json=body)
        assert refused.status_code == 403
        assert refused.json()["message"] == ("user 'dave' may not create serving endpoints: that needs the "
                                             "'create-serving-endpoints' entitlement; an admin grants it with "
                                             "`sqlinfer users entitle dave create-serving-endpoints`")
        server.service.auth.entitle("dave", "create-serving-endpoints")
        assert dave.post("/api/2.0/serving-endpoints", json=body).status_code == 200
        server.service.auth.entitle("dave", "create-serving-endpoints", granted=False)
        assert dave.post("/api/2.0/serving-endpoints", json=body | {"name": "daves2"}).status_code == 403


def test_the_egress_allow_list_refuses_urls_outside_it(server, admin, bob, listener, monkeypatch):
    monkeypatch.setenv("SQLINFER_EGRESS_ALLOW", "api.openai.com,.openai.azure.com,10.0.0.0/8")
    refused = admin.post("/api/2.0/serving-endpoints", json=openai_endpoint("out", listener.url))
    assert refused.status_code == 403
    host = listener.url.split("//")[1].split(":")[0]
    assert refused.json()["message"] == (
        f"config.served_entities[0].external_model.openai_config.openai_api_base = {listener.url!r}: host {host!r} is not "
        f"in this server's egress allow-list (SQLINFER_EGRESS_ALLOW=api.openai.com,.openai.azure.com,10.0.0.0/8); "
        f"use an allowed host or ask the operator to add it")
    monkeypatch.setenv("SQLINFER_EGRESS_ALLOW", f"api.openai.com,{host}/32")
    admin.post("/api/2.0/serving-endpoints", json=openai_endpoint("out", listener.url)).raise_for_status()
    wait_until_settled(admin, "out")
    query = {"messages": [{"role": "user", "content": "hi"}]}
    assert admin.post("/serving-endpoints/out/invocations", json=query).status_code == 200
    monkeypatch.setenv("SQLINFER_EGRESS_ALLOW", "api.openai.com")  # narrowed: the next call is refused
    again = admin.post("/serving-endpoints/out/invocations", json=query)
    assert again.status_code == 403 and "egress allow-list" in again.json()["message"], again.text
    assert len(listener.calls) == 1


def test_an_unknown_system_name_reveals_no_other_endpoint(server, admin, bob):
    admin.post("/api/2.0/serving-endpoints", json={"name": "secret-project", "config": {"served_entities": [
        {"entity_name": "smollm2-135m-instruct"}]}}).raise_for_status()
    for response in (bob.post("/serving-endpoints/system-nope/invocations", json={"messages": [{"role": "user", "content": "x"}]}),
                     bob.post("/serving-endpoints/chat/completions", json={"model": "system-nope", "messages": [{"role": "user", "content": "x"}]}),
                     bob.get("/api/2.0/sqlinfer/endpoints/system-nope")):
        assert response.status_code == 404, response.text
        assert "secret-project" not in response.text and "system-nope" in response.text


def test_changing_a_config_needs_the_entitlement_too(server, admin, bob):
    admin.post("/api/2.0/serving-endpoints", json={"name": "shared", "config": {"served_entities": [
        {"entity_name": "smollm2-135m-instruct"}]}}).raise_for_status()
    endpoint = wait_until_settled(admin, "shared")
    admin.patch(f"/api/2.0/permissions/serving-endpoints/{endpoint['id']}",
                json={"access_control_list": [{"user_name": "carol", "permission_level": "CAN_MANAGE"}]}).raise_for_status()
    with server.client(server.service.auth.create_token("carol")[1]) as carol:
        refused = carol.put("/api/2.0/serving-endpoints/shared/config",
                            json={"served_entities": [{"entity_name": "system.ai.smollm2-135m-instruct"}]})
        assert refused.status_code == 403 and "'create-serving-endpoints' entitlement" in refused.json()["message"]
        assert carol.patch("/api/2.0/serving-endpoints/shared/tags", json={"add_tags": [{"key": "k"}]}).status_code == 200


def test_the_default_openai_url_is_inside_the_allow_list_or_refused(server, admin, monkeypatch):
    monkeypatch.setenv("SQLINFER_EGRESS_ALLOW", "10.0.0.0/8")
    refused = admin.post("/api/2.0/serving-endpoints", json={"name": "default-base", "config": {"served_entities": [{
        "external_model": {"name": "gpt-x", "provider": "openai", "task": "llm/v1/chat",
                           "openai_config": {"openai_api_key": "{{secrets/my_scope/my_openai_api_key}}"}}}]}})
    assert refused.status_code == 403 and "'https://api.openai.com/v1'" in refused.json()["message"]


def test_a_token_never_outlives_the_token_that_made_it(server):
    import time

    _, short = server.service.auth.create_token("temp", lifetime_seconds=60)
    with server.client(short) as client:
        made = client.post("/api/2.0/token/create", json={"comment": "longer?"}).json()
    assert 0 < made["token_info"]["expiry_time"] <= (time.time() + 61) * 1000
