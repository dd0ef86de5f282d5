"""The REST edge as a whole: every route authenticated by construction, limits, and errors that keep
the connection alive. A real server on a loopback socket.
"""

from __future__ import annotations

import json
import socket

import pytest

from serving.api.guard import public_paths
from tests.registry_helpers import local_entity, wait_until_settled

OWNED = "owned"  # an endpoint the admin created; the ordinary user has no permission on it

# Every non-public route, with a request an ordinary user (no permission, no entitlement) may send
# without a validation error, and what that user gets. 403 where a permission is needed; the
# secrets routes answer 404 instead, so that a user learns nothing about scopes they may not read.
# Routes every authenticated user may call expect their ordinary answer.
ROUTES = {
    ("POST", "/api/2.0/serving-endpoints"): ("", {"name": "new", "config": local_entity()}, 403),
    ("GET", "/api/2.0/serving-endpoints"): ("", None, 200),
    ("GET", "/api/2.0/serving-endpoints/get-model-optimization-info/{model}/{version}"):
        ("/all-minilm-l6-v2/1", None, 200),  # a chat model would measure its throughput (test_provisioned.py)
    ("GET", "/api/2.0/serving-endpoints/{name}"): (f"/{OWNED}", None, 403),
    ("GET", "/api/2.0/serving-endpoints/{name}/served-models/{served_model}/logs"):
        (f"/{OWNED}/served-models/smollm2-135m-instruct/logs", None, 403),
    ("GET", "/api/2.0/serving-endpoints/{name}/served-models/{served_model}/build-logs"):
        (f"/{OWNED}/served-models/smollm2-135m-instruct/build-logs", None, 403),
    ("GET", "/api/2.0/serving-endpoints/{name}/metrics"): (f"/{OWNED}/metrics", None, 403),
    ("GET", "/api/2.0/serving-endpoints/{name}/openapi"): (f"/{OWNED}/openapi", None, 403),
    ("GET", "/api/2.0/permissions/serving-endpoints/{endpoint_id}/permissionLevels"): ("/{id}/permissionLevels", None, 403),
    ("POST", "/serving-endpoints/responses"): ("", {"model": OWNED, "input": "hi"}, 403),
    ("GET", "/serving-endpoints/models"): ("", None, 200),
    ("GET", "/serving-endpoints/models/{model_id}"): (f"/{OWNED}", None, 404),
    ("DELETE", "/api/2.0/serving-endpoints/{name}"): (f"/{OWNED}", None, 403),
    ("PUT", "/api/2.0/serving-endpoints/{name}/config"): (f"/{OWNED}/config", local_entity(), 403),
    ("PATCH", "/api/2.0/serving-endpoints/{name}/tags"): (f"/{OWNED}/tags", {"add_tags": [{"key": "k"}]}, 403),
    ("PUT", "/api/2.0/serving-endpoints/{name}/rate-limits"):
        (f"/{OWNED}/rate-limits", {"rate_limits": [{"calls": 1, "key": "user", "renewal_period": "minute"}]}, 403),
    ("PUT", "/api/2.0/serving-endpoints/{name}/ai-gateway"): (f"/{OWNED}/ai-gateway", {"usage_tracking_config": {"enabled": True}}, 403),
    ("GET", "/api/2.0/permissions/serving-endpoints/{endpoint_id}"): ("/{id}", None, 403),
    ("PUT", "/api/2.0/permissions/serving-endpoints/{endpoint_id}"):
        ("/{id}", {"access_control_list": [{"user_name": "user", "permission_level": "CAN_MANAGE"}]}, 403),
    ("PATCH", "/api/2.0/permissions/serving-endpoints/{endpoint_id}"):
        ("/{id}", {"access_control_list": [{"user_name": "user", "permission_level": "CAN_MANAGE"}]}, 403),
    ("POST", "/api/2.0/secrets/scopes/create"): ("", {"scope": "users-own"}, 200),
    ("GET", "/api/2.0/secrets/scopes/list"): ("", None, 200),
    ("POST", "/api/2.0/secrets/scopes/delete"): ("", {"scope": "my_scope"}, 404),
    ("POST", "/api/2.0/secrets/put"): ("", {"scope": "my_scope", "key": "k", "string_value": "v"}, 404),
    ("GET", "/api/2.0/secrets/list"): ("?scope=my_scope", None, 404),
    ("POST", "/api/2.0/secrets/delete"): ("", {"scope": "my_scope", "key": "my_openai_api_key"}, 404),
    ("POST", "/api/2.0/secrets/acls/put"): ("", {"scope": "my_scope", "principal": "user", "permission": "MANAGE"}, 404),
    ("POST", "/api/2.0/secrets/acls/delete"): ("", {"scope": "my_scope", "principal": "admin@example.com"}, 404),
    ("GET", "/api/2.0/secrets/acls/get"): ("?scope=my_scope&principal=user", None, 404),
    ("GET", "/api/2.0/secrets/acls/list"): ("?scope=my_scope", None, 404),
    ("GET", "/api/2.0/preview/scim/v2/Groups"): ("", None, 200),
    ("POST", "/api/2.0/preview/scim/v2/Groups"): ("", {"displayName": "mine"}, 403),
    ("GET", "/api/2.0/preview/scim/v2/Groups/{group_id}"): ("/nope", None, 404),
    ("PATCH", "/api/2.0/preview/scim/v2/Groups/{group_id}"):
        ("/nope", {"Operations": [{"op": "add", "path": "members", "value": [{"value": "user"}]}]}, 403),
    ("DELETE", "/api/2.0/preview/scim/v2/Groups/{group_id}"): ("/nope", None, 403),
    ("GET", "/api/2.0/preview/scim/v2/ServicePrincipals"): ("", None, 200),
    ("POST", "/api/2.0/preview/scim/v2/ServicePrincipals"): ("", {"displayName": "bot"}, 403),
    ("GET", "/api/2.0/preview/scim/v2/ServicePrincipals/{sp_id}"): ("/nope", None, 404),
    ("DELETE", "/api/2.0/preview/scim/v2/ServicePrincipals/{sp_id}"): ("/nope", None, 403),
    ("POST", "/api/2.0/token-management/on-behalf-of/tokens"): ("", {"application_id": "nope"}, 403),
    ("POST", "/api/2.0/token/create"): ("", {"comment": "mine"}, 200),
    ("GET", "/api/2.0/token/list"): ("", None, 200),
    ("POST", "/api/2.0/token/delete"): ("", {"token_id": "someone-elses"}, 404),
    ("POST", "/serving-endpoints/chat/completions"): ("", {"model": OWNED, "messages": [{"role": "user", "content": "hi"}]}, 403),
    ("POST", "/serving-endpoints/completions"): ("", {"model": OWNED, "prompt": "hi"}, 403),
    ("POST", "/serving-endpoints/embeddings"): ("", {"model": OWNED, "input": "hi"}, 403),
    ("POST", "/serving-endpoints/{name}/invocations"): (f"/{OWNED}/invocations", {"messages": [{"role": "user", "content": "hi"}]}, 403),
    ("GET", "/serving-endpoints/{name}/metrics"): (f"/{OWNED}/metrics", None, 403),
    ("GET", "/api/2.0/sqlinfer/endpoints"): ("", None, 200),
    ("GET", "/api/2.0/sqlinfer/endpoints/{name}"): (f"/{OWNED}", None, 403),
    ("POST", "/api/2.0/sqlinfer/batch"): ("", {"endpoint": OWNED, "kind": "chat", "requests": ["hi"]}, 403),
    ("POST", "/api/2.0/ai-functions/{function}"): ("/ai_gen", {"inputs": ["hi"], "endpoint": OWNED}, 403),
    ("GET", "/api/2.0/sqlinfer/serving-endpoints/{name}/usage"): (f"/{OWNED}/usage", None, 403),
    ("GET", "/api/2.0/sqlinfer/serving-endpoints/{name}/config-history"): (f"/{OWNED}/config-history", None, 403),
    ("GET", "/api/2.0/sqlinfer/serving-endpoints/{name}/inference-rows"): (f"/{OWNED}/inference-rows", None, 403),
    ("GET", "/api/2.0/preview/scim/v2/Me"): ("", None, 200),
    # A statement is accepted (200) and then FAILED with PERMISSION_DENIED (tests/test_statements.py).
    ("POST", "/api/2.0/sql/statements"): ("", {"statement": f"SELECT ai_query('{OWNED}', 'hi')", "wait_timeout": "5s"}, 200),
    ("GET", "/api/2.0/sql/statements/{statement_id}"): ("/nope", None, 404),
    ("POST", "/api/2.0/sql/statements/{statement_id}/cancel"): ("/nope/cancel", None, 404),
    ("POST", "/api/2.0/sqlinfer/sql/explain"): ("", {"statement": f"SELECT ai_query('{OWNED}', 'hi')"}, 403),
    # OpenAI's Files and Batch APIs, under both prefixes: a user sees only their own (tests/test_batch_api.py)
    **{route: answer for prefix in ("/v1", "/serving-endpoints") for route, answer in {
        ("POST", f"{prefix}/files"): ("", {"purpose": "batch"}, 400),  # not multipart: the file is missing
        ("GET", f"{prefix}/files"): ("", None, 200),
        ("GET", f"{prefix}/files/{{file_id}}"): ("/nope", None, 404),
        ("GET", f"{prefix}/files/{{file_id}}/content"): ("/nope/content", None, 404),
        ("POST", f"{prefix}/batches"): ("", {"input_file_id": "nope", "endpoint": "/v1/chat/completions"}, 404),
        ("GET", f"{prefix}/batches"): ("", None, 200),
        ("GET", f"{prefix}/batches/{{batch_id}}"): ("/nope", None, 404),
        ("POST", f"{prefix}/batches/{{batch_id}}/cancel"): ("/nope/cancel", None, 404),
    }.items()},
}


def concrete(route: tuple[str, str], endpoint_id: str) -> str:
    method, template = route
    suffix, _, _ = ROUTES[route]
    base = template.split("{")[0].rstrip("/") if "{" in template else template
    return (base + suffix).replace("{id}", endpoint_id)


@pytest.fixture
def owned(server, admin):
    admin.post("/api/2.0/serving-endpoints", json={"name": OWNED, "config": local_entity()}).raise_for_status()
    return wait_until_settled(admin, OWNED)["id"]


def test_every_route_is_authenticated_and_permission_checked(server, admin, owned):
    from fastapi.routing import APIRoute

    app_routes = {(method, route.path) for route in server.app.routes if isinstance(route, APIRoute)
                  for method in route.methods if route.path not in public_paths() and route.include_in_schema}
    app_routes = {(method, path.replace("{model_id:path}", "{model_id}")) for method, path in app_routes}
    assert app_routes == set(ROUTES), "every route needs an entry here (add new routes to ROUTES)"
    auth = server.service.auth
    revoked_id, revoked = auth.create_token("gone")
    auth.revoke_token(revoked_id)
    _, ordinary = auth.create_token("user")
    checked = 0
    for route in sorted(ROUTES):
        method, _ = route
        path = concrete(route, owned)
        body = ROUTES[route][1]
        for token in (None, "sqli_forged", revoked):
            with server.client(token) as client:
                response = client.request(method, path, json=body)
            assert response.status_code == 401, (route, token, response.text)
            error = response.json().get("error") or response.json()  # OpenAI's shape on the OpenAI routes
            assert error.get("error_code", error.get("code")) == "UNAUTHENTICATED", (route, response.text)
        with server.client(ordinary) as client:
            response = client.request(method, path, json=body)
        assert response.status_code == ROUTES[route][2], (route, response.status_code, response.text)
        checked += 1
    assert checked == len(ROUTES) >= 30


def test_the_body_is_not_read_before_authentication(server):
    with server.client(None) as anonymous:
        for path in ("/serving-endpoints/chat/completions", "/api/2.0/sqlinfer/batch", "/api/2.0/serving-endpoints"):
            response = anonymous.post(path, content=b"{not json", headers={"Content-Type": "application/json"})
            assert response.status_code == 401, (path, response.text)
        unknown = anonymous.get("/api/2.0/no/such/route")
        assert unknown.status_code == 401  # anonymous callers learn nothing about which routes exist


def raw_exchange(port: int, requests: list[bytes]) -> list[tuple[int, dict[str, str], bytes]]:
    """Send HTTP/1.1 requests one after another on ONE connection; their status, headers and body."""
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        stream = sock.makefile("rb")
        for request in requests:
            sock.sendall(request)
            status = int(stream.readline().split()[1])
            headers = {}
            while (line := stream.readline().strip()):
                key, _, value = line.decode().partition(":")
                headers[key.strip().lower()] = value.strip()
            answers.append((status, headers, stream.read(int(headers.get("content-length", 0)))))
    return answers


def http(method: str, path: str, token: str, body: bytes = b"") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def test_an_error_never_costs_the_client_its_connection(server, admin, monkeypatch):
    _, token = server.service.auth.create_token("root", is_admin=True)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in sqlinfer")

    monkeypatch.setattr(server.service, "optimization_info", broken)
    answers = raw_exchange(server.port, [
        http("POST", "/api/2.0/serving-endpoints", token, b'{"name": 1}'),                                # 400
        http("GET", "/api/2.0/serving-endpoints/get-model-optimization-info/m/1", token),                 # forced 500
        http("GET", "/api/2.0/serving-endpoints/nope", token),                                            # 404
        http("GET", "/api/2.0/serving-endpoints", token),                                                 # 200
    ])
    assert [status for status, _, _ in answers] == [400, 500, 404, 200]
    assert json.loads(answers[1][2]) == {"error_code": "INTERNAL_ERROR",
                                         "message": "internal error in sqlinfer; the server log has the details"}
    assert all(headers.get("connection") != "close" for _, headers, _ in answers)


def test_a_500_on_an_openai_route_comes_in_openais_shape(server, admin, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug in sqlinfer")

    monkeypatch.setattr("serving.api.queries.invoke", broken)
    response = admin.post("/serving-endpoints/chat/completions",
                          json={"model": "system-echo", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 500
    assert response.json() == {"error": {"message": "internal error in sqlinfer; the server log has the details",
                                         "type": "internal_error", "code": "INTERNAL_ERROR"}}
    missing = admin.get("/serving-endpoints/models/none")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "RESOURCE_DOES_NOT_EXIST"
    no_route = admin.post("/serving-endpoints/chat/nothing", json={})
    assert no_route.status_code == 404 and no_route.json()["error"]["code"] == "ENDPOINT_NOT_FOUND"


def test_bodies_depth_and_fields_are_bounded(server, admin, monkeypatch):
    monkeypatch.setenv("SQLINFER_MAX_BODY_BYTES", "100000")
    big = admin.post("/api/2.0/serving-endpoints", content=b'{"name": "' + b"x" * 200_000 + b'"}')
    assert big.status_code == 413 and big.json() == {
        "error_code": "REQUEST_TOO_LARGE", "message": "the request body has 200012 bytes; this server accepts at most "
                                                      "100000 (SQLINFER_MAX_BODY_BYTES); send fewer rows per request"}
    for levels in (100, 10_000):  # one Python's parser takes, one it cannot
        deep = admin.post("/api/2.0/serving-endpoints", content=b'{"config": ' + b"{\"a\": " * levels + b"1" + b"}" * (levels + 1))
        assert deep.status_code == 400 and deep.json() == {
            "error_code": "MALFORMED_REQUEST", "message": "the request body nests deeper than 64 levels, the most this server accepts"}
    tag = admin.post("/api/2.0/serving-endpoints", json={"name": "t", "config": local_entity(),
                                                          "tags": [{"key": "k", "value": "v" * 5_000}]})
    assert tag.status_code == 400 and tag.json()["message"].startswith(
        "tags[0].value: String should have at most 255 characters (got 'vvvv")
    assert admin.get("/api/2.0/serving-endpoints/t").status_code == 404  # nothing stored
    huge_tokens = admin.post("/serving-endpoints/system-echo/invocations",
                             json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**12})
    assert huge_tokens.status_code == 400 and "max_tokens: Input should be less than or equal to 1000000" in huge_tokens.text


def test_metrics_can_require_a_token(server, monkeypatch):
    with server.client(None) as anonymous:
        assert anonymous.get("/metrics").status_code == 200
        monkeypatch.setenv("SQLINFER_METRICS_AUTH", "token")
        assert anonymous.get("/metrics").status_code == 401
        assert anonymous.get("/health").status_code == 200
