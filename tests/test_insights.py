"""The read-only routes the Serving UI draws endpoint pages from (serving/api/insights.py) and SCIM's
``/Me``: usage over time, config history, inference rows. A real server on a loopback socket; the
queries go to the scripted OpenAI-protocol provider (tests/fake_providers.py), never a model.
"""

from __future__ import annotations

import copy
import time
import uuid

from serving.data.usage import COLUMNS
from tests.registry_helpers import CREATE_EXAMPLE, PLAINTEXT_VALUE, SECRET_VALUE, external_endpoint, wait_until_settled

INSIGHTS = "/api/2.0/sqlinfer/serving-endpoints"
ME = "/api/2.0/preview/scim/v2/Me"
SYSTEM = "system-smollm2-135m-instruct"


def ask(client, name: str, text: str):
    return client.post(f"/serving-endpoints/{name}/invocations", json={"messages": [{"role": "user", "content": text}]})


def created(server, admin, name: str, upstream_url: str) -> str:
    admin.post("/api/2.0/serving-endpoints", json=external_endpoint(name, upstream_url)).raise_for_status()
    server.service.wait_for_deployments()
    return admin.get(f"/api/2.0/serving-endpoints/{name}").json()["id"]


def nearest_rank(values: list[float], p: int) -> float:
    ordered = sorted(values)
    return ordered[max(1, -(-p * len(ordered) // 100)) - 1]


def user(server, name: str, **kwargs):
    return server.client(server.service.auth.create_token(name, **kwargs)[1])


def grant(admin, endpoint_id: str, user_name: str, level: str) -> None:
    admin.patch(f"/api/2.0/permissions/serving-endpoints/{endpoint_id}", json={
        "access_control_list": [{"user_name": user_name, "permission_level": level}]}).raise_for_status()


def test_usage_counts_the_queries_made_with_latency_percentiles_and_cost(server, admin, upstream, monkeypatch):
    monkeypatch.delenv("SQLINFER_PRICES", raising=False)
    created(server, admin, "watched", upstream.url)
    for text in ("one", "two", "three"):
        assert ask(admin, "watched", text).status_code == 200
    upstream.faults.append(("status", 400))
    assert ask(admin, "watched", "refused").status_code == 400

    response = admin.get(f"{INSIGHTS}/watched/usage", params={"window_minutes": 60, "buckets": 30})
    assert response.status_code == 200, response.text
    usage = response.json()
    assert usage["endpoint"] == "watched" and usage["price"] is None
    assert usage["bucket_ms"] == 120_000 and usage["end_time_ms"] - usage["start_time_ms"] == 3_600_000
    assert len(usage["buckets"]) == 30
    assert [b["start_time_ms"] for b in usage["buckets"]] == [usage["start_time_ms"] + i * 120_000 for i in range(30)]
    totals = usage["totals"]
    # the scripted provider answers every chat with 3 prompt and 2 generated tokens; the refusal costs none
    assert {k: totals[k] for k in ("requests", "errors", "input_tokens", "output_tokens", "cost")} == {
        "requests": 4, "errors": 1, "input_tokens": 9, "output_tokens": 6, "cost": None}
    assert sum(b["requests"] for b in usage["buckets"]) == 4 and sum(b["errors"] for b in usage["buckets"]) == 1
    assert usage["buckets"][-1]["requests"] == 4  # all of them just now
    empty = usage["buckets"][0]
    assert empty == {"start_time_ms": usage["start_time_ms"], "requests": 0, "errors": 0, "input_tokens": 0,
                     "output_tokens": 0, "latency_ms_p50": None, "latency_ms_p90": None, "latency_ms_p99": None,
                     "cost": None}
    latencies = [row["latency_ms"] for row in server.app.state.usage.rows("watched")]
    assert len(latencies) == 4
    for p in (50, 90, 99):
        assert totals[f"latency_ms_p{p}"] == nearest_rank(latencies, p) == usage["buckets"][-1][f"latency_ms_p{p}"]

    monkeypatch.setenv("SQLINFER_PRICES", "other=9/9, watched=1.5/6")
    priced = admin.get(f"{INSIGHTS}/watched/usage").json()
    assert priced["price"] == {"input_per_million": 1.5, "output_per_million": 6.0}
    assert priced["totals"]["cost"] == priced["buckets"][-1]["cost"] == (9 * 1.5 + 6 * 6.0) / 1e6
    assert priced["buckets"][0]["cost"] == 0.0


def test_buckets_and_nearest_rank_percentiles_are_exact(server, admin, upstream):
    endpoint_id = created(server, admin, "synthetic", upstream.url)
    now = int(time.time() * 1000)

    def row(at_ms: int, latency: float, status: int = 200, endpoint: str = "synthetic", of: str = endpoint_id) -> tuple:
        values = {"request_id": uuid.uuid4().hex, "timestamp_ms": at_ms, "endpoint_name": endpoint, "endpoint_id": of,
                  "requester": "someone", "source": "rest", "input_tokens": 10, "output_tokens": 1,
                  "status_code": status, "latency_ms": latency}
        return tuple(values.get(column) for column in COLUMNS)

    late = [row(now - 30_000, float(ms), 429 if ms in (2, 3) else 200) for ms in (5, 1, 9, 3, 7, 2, 10, 4, 8, 6)]
    early = [row(now - 330_000, 100.0, 500)]
    ignored = [row(now - 11 * 60_000, 1e6),                     # before the window
               row(now - 30_000, 1e6, endpoint="other"),         # another endpoint
               row(now - 30_000, 1e6, of="a-deleted-namesake")]  # an earlier endpoint of the same name
    server.app.state.usage.record(late + early + ignored)

    usage = admin.get(f"{INSIGHTS}/synthetic/usage", params={"window_minutes": 10, "buckets": 10}).json()
    assert usage["bucket_ms"] == 60_000 and len(usage["buckets"]) == 10
    assert [b["requests"] for b in usage["buckets"]] == [0, 0, 0, 0, 1, 0, 0, 0, 0, 10]
    assert {k: usage["buckets"][9][k] for k in ("errors", "input_tokens", "output_tokens", "latency_ms_p50",
                                                  "latency_ms_p90", "latency_ms_p99")} == {
        "errors": 2, "input_tokens": 100, "output_tokens": 10,
        "latency_ms_p50": 5.0, "latency_ms_p90": 9.0, "latency_ms_p99": 10.0}
    assert usage["buckets"][4]["latency_ms_p50"] == usage["buckets"][4]["latency_ms_p99"] == 100.0
    assert usage["totals"] == {"requests": 11, "errors": 3, "input_tokens": 110, "output_tokens": 11,
                               "latency_ms_p50": 6.0, "latency_ms_p90": 10.0, "latency_ms_p99": 100.0, "cost": None}


def test_parameters_out_of_range_are_refused_by_name(server, admin, upstream):
    created(server, admin, "ranged", upstream.url)
    for params, field in (({"window_minutes": 0}, "window_minutes"), ({"window_minutes": 43_201}, "window_minutes"),
                          ({"window_minutes": "soon"}, "window_minutes"), ({"buckets": 0}, "buckets"),
                          ({"buckets": 201}, "buckets")):
        response = admin.get(f"{INSIGHTS}/ranged/usage", params=params)
        assert response.status_code == 400, (params, response.text)
        body = response.json()
        assert body["error_code"] == "INVALID_PARAMETER_VALUE" and body["message"].startswith(f"{field}: "), body
        assert str(list(params.values())[0]) in body["message"]
    assert "43200" in admin.get(f"{INSIGHTS}/ranged/usage", params={"window_minutes": 43_201}).json()["message"]
    assert admin.get(f"{INSIGHTS}/ranged/usage", params={"window_minutes": 43_200, "buckets": 200}).status_code == 200
    too_many = admin.get(f"{INSIGHTS}/ranged/inference-rows", params={"limit": 101})
    assert too_many.status_code == 400 and too_many.json()["message"].startswith("limit: ")


def test_who_may_read_what(server, admin, upstream):
    endpoint_id = created(server, admin, "guarded", upstream.url)
    routes = ("usage", "config-history", "inference-rows")
    with user(server, "stranger") as stranger, user(server, "viewer") as viewer, user(server, "manager") as manager:
        for route in routes:
            refused = stranger.get(f"{INSIGHTS}/guarded/{route}")
            assert refused.status_code == 403 and refused.json()["error_code"] == "PERMISSION_DENIED", refused.text
            assert "guarded" in refused.json()["message"]
            missing = stranger.get(f"{INSIGHTS}/no-such-endpoint/{route}")
            assert missing.status_code == 404 and "no-such-endpoint" in missing.json()["message"]
        grant(admin, endpoint_id, "viewer", "CAN_VIEW")
        grant(admin, endpoint_id, "manager", "CAN_MANAGE")
        assert viewer.get(f"{INSIGHTS}/guarded/usage").status_code == 200
        assert viewer.get(f"{INSIGHTS}/guarded/config-history").status_code == 200
        payloads = viewer.get(f"{INSIGHTS}/guarded/inference-rows")
        assert payloads.status_code == 403 and "CAN_MANAGE" in payloads.json()["message"]
        assert manager.get(f"{INSIGHTS}/guarded/inference-rows").json() == {"rows": []}

        # every user may view the system endpoints (no history there); only admins manage them
        assert stranger.get(f"{INSIGHTS}/{SYSTEM}/usage").json()["totals"]["requests"] == 0
        assert stranger.get(f"{INSIGHTS}/{SYSTEM}/config-history").json() == {"versions": []}
        assert stranger.get(f"{INSIGHTS}/{SYSTEM}/inference-rows").status_code == 403
        assert admin.get(f"{INSIGHTS}/{SYSTEM}/inference-rows").json() == {"rows": []}
        assert stranger.get(f"{INSIGHTS}/system-nonexistent/usage").status_code == 404


def test_config_history_lists_versions_newest_first_without_secrets(server, admin):
    admin.post("/api/2.0/serving-endpoints", json=CREATE_EXAMPLE).raise_for_status()
    wait_until_settled(admin, "openai_endpoint")
    update = copy.deepcopy(CREATE_EXAMPLE["config"])
    update["served_entities"][0]["external_model"]["openai_config"] = {"openai_api_key_plaintext": PLAINTEXT_VALUE}
    admin.put("/api/2.0/serving-endpoints/openai_endpoint/config", json=update).raise_for_status()
    wait_until_settled(admin, "openai_endpoint")

    response = admin.get(f"{INSIGHTS}/openai_endpoint/config-history")
    assert response.status_code == 200, response.text
    versions = response.json()["versions"]
    assert [(v["config_version"], v["outcome"]) for v in versions] == [(2, "READY"), (1, "READY")]
    assert versions[0]["created_timestamp"] >= versions[1]["created_timestamp"] > 0
    first = versions[1]["config"]["served_entities"][0]["external_model"]
    assert first["openai_config"] == {"openai_api_key": "{{secrets/my_scope/my_openai_api_key}}"}
    assert versions[0]["config"]["served_entities"][0]["external_model"]["openai_config"] == {}  # sealed: not shown
    for secret in (SECRET_VALUE, PLAINTEXT_VALUE, "__sealed__"):
        assert secret not in response.text

    def keys(value):
        if isinstance(value, dict):
            return set(value) | {k for v in value.values() for k in keys(v)}
        return {k for v in value for k in keys(v)} if isinstance(value, list) else set()

    assert not any(key.startswith("_") for key in keys(versions))


def test_inference_rows_appear_once_the_inference_table_is_on(server, admin, upstream):
    endpoint_id = created(server, admin, "logged", upstream.url)
    assert ask(admin, "logged", "before the table").status_code == 200
    assert admin.get(f"{INSIGHTS}/logged/inference-rows").json() == {"rows": []}
    admin.put("/api/2.0/serving-endpoints/logged/ai-gateway",
              json={"inference_table_config": {"enabled": True}}).raise_for_status()
    grant(admin, endpoint_id, "manager", "CAN_QUERY")
    with user(server, "manager") as manager:
        assert ask(admin, "logged", "first").status_code == 200
        assert ask(manager, "logged", "second").status_code == 200
        grant(admin, endpoint_id, "manager", "CAN_MANAGE")
        rows = manager.get(f"{INSIGHTS}/logged/inference-rows").json()["rows"]
    assert [(r["requester"], r["status_code"], r["request"]) for r in rows] == [
        ("manager", 200, [{"role": "user", "content": "second"}]),
        ("admin@example.com", 200, [{"role": "user", "content": "first"}])]
    assert rows[0]["response"]["choices"] == ["second"]
    assert rows[0]["timestamp_ms"] >= rows[1]["timestamp_ms"] and len(rows[0]["request_id"]) == 32
    assert set(rows[0]) == {"request_id", "timestamp_ms", "requester", "status_code", "request", "response"}
    newest = admin.get(f"{INSIGHTS}/logged/inference-rows", params={"limit": 1}).json()["rows"]
    assert [r["request_id"] for r in newest] == [rows[0]["request_id"]]


def test_me_says_who_is_calling(server, admin):
    me = admin.get(ME).json()
    assert me == {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "id": "admin@example.com",
                  "userName": "admin@example.com", "displayName": "admin@example.com", "active": True,
                  "groups": [{"display": "users", "value": "users"}],
                  "entitlements": [{"value": "create-serving-endpoints"}], "sqlinfer_is_admin": True}
    admin.post("/api/2.0/preview/scim/v2/Groups", json={"displayName": "analysts",
                                                         "members": [{"value": "carol"}]}).raise_for_status()
    with user(server, "carol") as carol:
        mine = carol.get(ME).json()
        assert (mine["userName"], mine["sqlinfer_is_admin"], mine["entitlements"]) == ("carol", False, [])
        assert [g["display"] for g in mine["groups"]] == ["users", "analysts"]
        server.service.auth.entitle("carol", "create-serving-endpoints")
        assert carol.get(ME).json()["entitlements"] == [{"value": "create-serving-endpoints"}]
    sp = admin.post("/api/2.0/preview/scim/v2/ServicePrincipals", json={"displayName": "nightly job"}).json()
    token = admin.post("/api/2.0/token-management/on-behalf-of/tokens", json={"application_id": sp["applicationId"]})
    with server.client(token.json()["token_value"]) as robot:
        assert {k: v for k, v in robot.get(ME).json().items() if k in ("userName", "displayName")} == {
            "userName": sp["applicationId"], "displayName": "nightly job"}
