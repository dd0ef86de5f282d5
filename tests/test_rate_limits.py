"""Rate limits: REST gets 429 + Retry-After, SQL waits, and limits hold across server processes."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from engine.types import SamplingOptions
from serving.control.service import EndpointService
from serving.data.limits import Limit, RateLimitedBackend, RateLimiter, limit_mode
from serving.data.providers import OpenAICompatibleBackend
from tests.registry_helpers import external_endpoint
from tests.rest_server import serve_processes

ASK = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}




def start_of_a_window() -> None:
    """Counters are per wall-clock minute: start a real-clock test well inside one, never at its end."""
    if time.time() % 60 > 45:
        time.sleep(61 - time.time() % 60)


def test_rest_callers_get_429_with_retry_after_per_endpoint_and_per_user(server, admin, upstream):
    admin.post("/api/2.0/serving-endpoints", json=external_endpoint("limited", upstream.url)).raise_for_status()
    server.service.wait_for_deployments()
    admin.put("/api/2.0/serving-endpoints/limited/ai-gateway", json={"rate_limits": [
        {"calls": 5, "key": "endpoint", "renewal_period": "minute"},
        {"calls": 2, "key": "user", "renewal_period": "minute"}]}).raise_for_status()
    endpoint_id = admin.get("/api/2.0/serving-endpoints/limited").json()["id"]
    start_of_a_window()
    clients = {}
    for user in ("u1", "u2", "u3"):
        clients[user] = server.client(server.service.auth.create_token(user)[1])
        admin.patch(f"/api/2.0/permissions/serving-endpoints/{endpoint_id}",
                    json={"access_control_list": [{"user_name": user, "permission_level": "CAN_QUERY"}]}).raise_for_status()
    statuses = {user: [c.post("/serving-endpoints/limited/invocations", json=ASK).status_code for _ in range(3)]
                for user, c in clients.items()}
    assert statuses["u1"] == [200, 200, 429] and statuses["u2"] == [200, 200, 429]  # 2 per user
    assert statuses["u3"] == [200, 429, 429]  # the endpoint-wide 5 ran out
    refused = clients["u3"].post("/serving-endpoints/limited/invocations", json=ASK)
    assert refused.json()["error_code"] == "REQUEST_LIMIT_EXCEEDED"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert len(upstream.calls) == 5  # refused requests never reached the provider
    for c in clients.values():
        c.close()


def test_token_limits_stop_a_window_once_spent(server, admin, upstream):
    admin.post("/api/2.0/serving-endpoints", json=external_endpoint("tokens", upstream.url)).raise_for_status()
    server.service.wait_for_deployments()
    admin.put("/api/2.0/serving-endpoints/tokens/ai-gateway",
              json={"rate_limits": [{"tokens": 10, "key": "endpoint", "renewal_period": "minute"}]}).raise_for_status()
    # each scripted answer uses 5 tokens: the third call finds the 10-token budget spent
    start_of_a_window()
    statuses = [admin.post("/serving-endpoints/tokens/invocations", json=ASK).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]


class Clock:
    def __init__(self):
        self.now = 1_000_000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_the_sql_path_waits_for_the_next_window_instead_of_failing(tmp_path, upstream):
    clock = Clock()
    service = EndpointService(tmp_path / "home")
    provider = OpenAICompatibleBackend("llm/v1/chat", "model-x", upstream.url, lambda: "k", max_concurrency=4)
    limited = RateLimitedBackend(provider, RateLimiter(service.db, clock), "endpoint-id", "limited",
                                 [Limit(calls=3, tokens=None, key="endpoint")], sleep=clock.sleep)
    seen_windows = []
    original = provider.chat

    def recording(conversations, options, on_result=None):
        seen_windows.append((int(clock.now // 60), len(conversations)))
        return original(conversations, options, on_result)

    provider.chat = recording
    assert limit_mode.get() == "wait"
    results = limited.chat([[{"role": "user", "content": f"row {i}"}] for i in range(10)], SamplingOptions(max_tokens=2))
    assert [r.text for r in results] == [f"row {i}" for i in range(10)]  # all answered, in order
    assert len(clock.slept) == 3  # waited for three new windows
    per_window: dict[int, int] = {}
    for window, size in seen_windows:
        per_window[window] = per_window.get(window, 0) + size
    assert max(per_window.values()) <= 3 and sum(per_window.values()) == 10


def test_limits_hold_across_server_processes(tmp_path, upstream):
    home = tmp_path / "home"
    service = EndpointService(home)
    _, token = service.auth.create_token("admin", is_admin=True)
    service.create(external_endpoint("shared", upstream.url))
    service.wait_for_deployments()
    service.put_ai_gateway("shared", {"rate_limits": [{"calls": 10, "key": "endpoint", "renewal_period": "minute"}]})

    with serve_processes(home, 2) as ports:
        start_of_a_window()

        def query(i: int) -> int:
            url = f"http://127.0.0.1:{ports[i % 2]}/serving-endpoints/shared/invocations"
            return httpx.post(url, json=ASK, headers={"Authorization": f"Bearer {token}"}, timeout=30).status_code

        with ThreadPoolExecutor(max_workers=12) as pool:
            statuses = list(pool.map(query, range(30)))
    assert statuses.count(200) == 10 and statuses.count(429) == 20
    assert len(upstream.calls) == 10
