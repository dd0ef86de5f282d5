"""The gateway's fast path (issue 18): what held before still holds when queries never leave the event loop.

Against real servers on 127.0.0.1: ``sqlinfer serve`` (in this process, or as its own process
where a change must come from *another* process), and the scripted OpenAI-protocol provider of
``tests/fake_providers.py``. The bound a registry change takes to reach a server is the config
refresh interval (``SQLINFER_CONFIG_REFRESH_SECONDS``, set to 0.2 s here); the tests wait 2.5
times that and then require the change, and require it at once in the process that made it.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import time

import httpx
import pytest

from serving.data.upstream import USER_AGENT
from tests.fake_providers import ScriptedOpenAIServer
from tests.registry_helpers import external_endpoint
from tests.rest_server import free_port, wait_healthy

REFRESH = 0.2  # the refresh interval the server subprocess runs with
SETTLED = 2.5 * REFRESH
CHAT = {"model": "fast", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}


@pytest.fixture
def home_service(tmp_path):
    """A registry home, the service of *this* process on it (another process to the server)."""
    from serving.control.service import EndpointService

    return EndpointService(tmp_path / "home")


@pytest.fixture
def serve(home_service):
    """``sqlinfer serve`` as its own process on ``home_service``'s registry; its URL."""
    port = free_port()
    env = os.environ | {"SQLINFER_HOME": str(home_service.home), "SQLINFER_CONFIG_REFRESH_SECONDS": str(REFRESH),
                        "SQLINFER_PROVIDER_BASE_DELAY": "0.01"}
    process = subprocess.Popen([os.path.join(os.path.dirname(os.sys.executable), "sqlinfer"), "serve", "--port", str(port),
                                "--log-level", "warning"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{url}/health")
        yield url, process
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)


def _endpoint(service, name: str, upstream_url: str, **extra) -> None:
    service.create(external_endpoint(name, upstream_url, **extra))
    service.wait_for_deployments()


def _chat(url: str, token: str, **fields):
    return httpx.post(f"{url}/serving-endpoints/chat/completions", json=CHAT | fields,
                      headers={"Authorization": f"Bearer {token}"}, timeout=30)


def test_queries_take_the_async_client_and_stay_correct(upstream, server, admin):
    """The answer, the served entity and the upstream call are as before, sent by the pooled async client."""
    admin.post("/api/2.0/serving-endpoints", json=external_endpoint("fast", upstream.url)).raise_for_status()
    server.service.wait_for_deployments()
    answered = admin.post("/serving-endpoints/chat/completions", json=CHAT)
    assert answered.status_code == 200, answered.text
    assert answered.json()["choices"][0]["message"]["content"] == "hello there"
    assert answered.headers["served-model-name"] == "model-x"
    via_invocations = admin.post("/serving-endpoints/fast/invocations", json={"messages": [{"role": "user", "content": "two"}]})
    assert via_invocations.json()["choices"][0]["message"]["content"] == "two"
    assert upstream.agents == [USER_AGENT, USER_AGENT]  # not the OpenAI SDK's client
    assert upstream.calls[0][1]["model"] == "model-x" and upstream.calls[0][1]["max_tokens"] == 4


def test_a_change_made_by_this_process_is_seen_by_the_next_request(upstream, server, admin):
    service = server.service
    admin.post("/api/2.0/serving-endpoints", json=external_endpoint("fast", upstream.url)).raise_for_status()
    service.wait_for_deployments()
    token_id, token = service.auth.create_token("bob")
    bob = {"Authorization": f"Bearer {token}"}
    assert httpx.post(f"{server.url}/serving-endpoints/chat/completions", json=CHAT, headers=bob).status_code == 403
    admin.patch("/api/2.0/permissions/serving-endpoints/" + service.endpoint_id("fast"),
                json={"access_control_list": [{"user_name": "bob", "permission_level": "CAN_QUERY"}]}).raise_for_status()
    assert httpx.post(f"{server.url}/serving-endpoints/chat/completions", json=CHAT, headers=bob).status_code == 200
    service.auth.revoke_token(token_id)
    assert httpx.post(f"{server.url}/serving-endpoints/chat/completions", json=CHAT, headers=bob).status_code == 401


def test_another_process_revoking_a_token_takes_effect_within_the_refresh_interval(upstream, home_service, serve):
    url, _ = serve
    _endpoint(home_service, "fast", upstream.url)
    token_id, token = home_service.auth.create_token("admin2", is_admin=True)
    time.sleep(SETTLED)
    assert _chat(url, token).status_code == 200  # now cached by the server
    home_service.auth.revoke_token(token_id)  # by this process: the server is another one
    time.sleep(SETTLED)
    refused = _chat(url, token)
    assert refused.status_code == 401 and "revoked" in refused.json()["error"]["message"]


def test_another_process_changing_a_permission_takes_effect_within_the_refresh_interval(upstream, home_service, serve):
    url, _ = serve
    _endpoint(home_service, "fast", upstream.url)
    _, token = home_service.auth.create_token("carol")
    endpoint_id = home_service.endpoint_id("fast")
    home_service.set_permissions(endpoint_id, {"access_control_list": [{"user_name": "carol", "permission_level": "CAN_QUERY"}]},
                                 replace=False)
    time.sleep(SETTLED)
    assert _chat(url, token).status_code == 200
    home_service.set_permissions(endpoint_id, {"access_control_list": [{"user_name": "carol", "permission_level": "CAN_VIEW"}]},
                                 replace=False)
    time.sleep(SETTLED)
    refused = _chat(url, token)
    assert refused.status_code == 403 and "CAN_QUERY" in refused.json()["error"]["message"]


def test_another_process_updating_the_config_moves_traffic_within_the_refresh_interval(upstream, home_service, serve):
    url, _ = serve
    _endpoint(home_service, "fast", upstream.url)
    _, token = home_service.auth.create_token("admin3", is_admin=True)
    time.sleep(SETTLED)
    assert _chat(url, token).status_code == 200 and len(upstream.calls) == 1
    second = ScriptedOpenAIServer()
    try:
        home_service.update_config("fast", {"served_entities": [{"external_model": {
            "name": "model-y", "provider": "custom", "task": "llm/v1/chat",
            "custom_provider_config": {"custom_provider_url": second.url}}}]})
        home_service.wait_for_deployments()
        time.sleep(SETTLED)
        moved = _chat(url, token)
        assert moved.status_code == 200 and moved.headers["served-model-name"] == "model-y"
        assert len(second.calls) == 1 and second.calls[0][1]["model"] == "model-y" and len(upstream.calls) == 1
    finally:
        second.stop()


def test_usage_rows_count_exactly_the_requests_and_are_written_at_shutdown(upstream, home_service, serve):
    """600 queries at concurrency 16, 50 of them refused by the provider (400): 600 rows, each
    with its status and requester, all in the database once the server has stopped."""
    url, process = serve
    _endpoint(home_service, "fast", upstream.url)
    _, token = home_service.auth.create_token("dave", is_admin=True)
    time.sleep(SETTLED)
    upstream.faults.extend([("status", 400)] * 50)

    async def load() -> list[int]:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
            gate = asyncio.Semaphore(16)

            async def one(i: int) -> int:
                async with gate:
                    response = await client.post("/serving-endpoints/chat/completions", json=CHAT | {"client_request_id": f"r{i}"})
                    return response.status_code
            return list(await asyncio.gather(*(one(i) for i in range(600))))

    statuses = asyncio.run(load())
    assert statuses.count(200) == 550 and statuses.count(400) == 50
    process.terminate()  # SIGTERM: the server flushes what it still holds
    process.wait(timeout=30)
    con = sqlite3.connect(home_service.home / "registry.db")
    rows = con.execute("SELECT status_code, requester, source, client_request_id FROM usage WHERE endpoint_name = 'fast'").fetchall()
    assert len(rows) == 600
    assert sorted(r[0] for r in rows).count(200) == 550 and [r[0] for r in rows].count(400) == 50
    assert {r[1] for r in rows} == {"dave"} and {r[2] for r in rows} == {"rest"}
    assert len({r[3] for r in rows}) == 600


def test_a_stream_to_a_provider_still_streams(upstream, server, admin):
    admin.post("/api/2.0/serving-endpoints", json=external_endpoint("fast", upstream.url)).raise_for_status()
    server.service.wait_for_deployments()
    with admin.stream("POST", "/serving-endpoints/chat/completions",
                      json=CHAT | {"messages": [{"role": "user", "content": "one two three four"}], "stream": True}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    pieces = [e for e in events if '"content"' in e]
    assert len(pieces) >= 4 and events[-1] == "data: [DONE]"
    assert upstream.calls[-1][1]["stream"] is True


def test_an_upstream_429_is_retried_after_its_retry_after(upstream, server, admin):
    admin.post("/api/2.0/serving-endpoints", json=external_endpoint("fast", upstream.url)).raise_for_status()
    server.service.wait_for_deployments()
    upstream.faults.append(("status", 429, {"Retry-After": "1"}))
    answered = admin.post("/serving-endpoints/chat/completions", json=CHAT)
    assert answered.status_code == 200, answered.text
    assert len(upstream.arrivals) == 2 and upstream.arrivals[1] - upstream.arrivals[0] >= 1.0
    assert upstream.agents == [USER_AGENT, USER_AGENT]


def test_a_5xx_falls_back_to_the_next_entity(upstream, server, admin, monkeypatch):
    monkeypatch.setenv("SQLINFER_PROVIDER_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("SQLINFER_PROVIDER_BASE_DELAY", "0.01")
    second = ScriptedOpenAIServer()
    try:
        entities = [{"name": name, "external_model": {"name": model, "provider": "custom", "task": "llm/v1/chat",
                                                      "custom_provider_config": {"custom_provider_url": base}}}
                    for name, model, base in (("primary", "model-a", upstream.url), ("spare", "model-b", second.url))]
        admin.post("/api/2.0/serving-endpoints", json={
            "name": "fast", "config": {"served_entities": entities,
                                       "traffic_config": {"routes": [{"served_model_name": "primary", "traffic_percentage": 100},
                                                                     {"served_model_name": "spare", "traffic_percentage": 0}]}},
            "ai_gateway": {"fallback_config": {"enabled": True}}}).raise_for_status()
        server.service.wait_for_deployments()
        upstream.faults.extend([("status", 503)] * 2)
        answered = admin.post("/serving-endpoints/chat/completions", json=CHAT)
        assert answered.status_code == 200, answered.text
        assert answered.headers["served-model-name"] == "spare"
        assert len(upstream.calls) == 2 and len(second.calls) == 1 and second.agents == [USER_AGENT]
        upstream.faults.append(("status", 400))  # a 4xx is the caller's: no fallback
        refused = admin.post("/serving-endpoints/chat/completions", json=CHAT)
        assert refused.status_code == 400 and len(second.calls) == 1
    finally:
        second.stop()


def test_a_rate_limit_answers_429_with_retry_after_on_the_fast_path(upstream, server, admin):
    admin.post("/api/2.0/serving-endpoints", json=external_endpoint(
        "fast", upstream.url, ai_gateway={"rate_limits": [{"calls": 3, "key": "endpoint", "renewal_period": "minute"}]})).raise_for_status()
    server.service.wait_for_deployments()
    statuses = [admin.post("/serving-endpoints/chat/completions", json=CHAT) for _ in range(5)]
    assert [r.status_code for r in statuses] == [200, 200, 200, 429, 429]
    assert int(statuses[3].headers["Retry-After"]) >= 1 and len(upstream.calls) == 3
