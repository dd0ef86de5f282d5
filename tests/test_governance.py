"""Groups and service principals: SCIM routes, permissions through groups, rate limits by group
and by service principal (across two server processes), on a real server over a socket."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from serving.control.service import EndpointService
from tests.registry_helpers import external_endpoint
from tests.rest_server import serve_processes
from tests.test_rate_limits import ASK, start_of_a_window

SCIM = "/api/2.0/preview/scim/v2"


def grant(admin, name: str, entry: dict) -> None:
    endpoint_id = admin.get(f"/api/2.0/serving-endpoints/{name}").json()["id"]
    admin.patch(f"/api/2.0/permissions/serving-endpoints/{endpoint_id}",
                json={"access_control_list": [entry]}).raise_for_status()


@pytest.fixture
def limited(server, admin, upstream):
    admin.post("/api/2.0/serving-endpoints", json=external_endpoint("governed", upstream.url)).raise_for_status()
    server.service.wait_for_deployments()
    return "governed"


def test_groups_are_managed_by_admins_with_databricks_scim_shapes(server, admin):
    created = admin.post(f"{SCIM}/Groups", json={"displayName": "analysts", "members": [{"value": "alice"}],
                                                 "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"]})
    assert created.status_code == 201, created.text
    group = created.json()
    assert group["displayName"] == "analysts" and group["members"] == [{"value": "alice", "display": "alice"}]
    patched = admin.patch(f"{SCIM}/Groups/{group['id']}", json={"Operations": [
        {"op": "add", "path": "members", "value": [{"value": "bob"}]}]}).json()
    assert [m["value"] for m in patched["members"]] == ["alice", "bob"]
    removed = admin.patch(f"{SCIM}/Groups/{group['id']}", json={"Operations": [
        {"op": "remove", "path": 'members[value eq "alice"]'}]}).json()
    assert [m["value"] for m in removed["members"]] == ["bob"]

    with server.client(server.service.auth.create_token("bob")[1]) as bob:
        listed = bob.get(f"{SCIM}/Groups").json()
        assert listed["totalResults"] == 1 and listed["Resources"][0]["displayName"] == "analysts"
        refused = bob.post(f"{SCIM}/Groups", json={"displayName": "mine"})
        assert refused.status_code == 403 and "is not an admin" in refused.json()["message"]
        assert bob.patch(f"{SCIM}/Groups/{group['id']}", json={"Operations": [
            {"op": "add", "path": "members", "value": [{"value": "bob"}]}]}).status_code == 403
    duplicate = admin.post(f"{SCIM}/Groups", json={"displayName": "analysts"})
    assert duplicate.status_code == 409 and duplicate.json()["error_code"] == "RESOURCE_ALREADY_EXISTS"
    reserved = admin.post(f"{SCIM}/Groups", json={"displayName": "users"})
    assert reserved.status_code == 400 and "every user's group" in reserved.json()["message"]
    bad_op = admin.patch(f"{SCIM}/Groups/{group['id']}", json={"Operations": [{"op": "replace", "path": "displayName",
                                                                              "value": "x"}]})
    assert bad_op.status_code == 400 and "Operations[0]" in bad_op.json()["message"]
    assert admin.delete(f"{SCIM}/Groups/{group['id']}").status_code == 204
    assert admin.get(f"{SCIM}/Groups/{group['id']}").status_code == 404


def test_a_group_permission_holds_for_members_and_stops_when_one_is_removed(server, admin, limited, upstream):
    group = admin.post(f"{SCIM}/Groups", json={"displayName": "scorers", "members": [{"value": "carol"}]}).json()
    grant(admin, limited, {"group_name": "scorers", "permission_level": "CAN_QUERY"})
    endpoint_id = admin.get(f"/api/2.0/serving-endpoints/{limited}").json()["id"]
    acl = admin.get(f"/api/2.0/permissions/serving-endpoints/{endpoint_id}").json()["access_control_list"]
    assert {"group_name": "scorers", "all_permissions": [{"permission_level": "CAN_QUERY", "inherited": False}]} in acl
    with server.client(server.service.auth.create_token("carol")[1]) as carol, \
            server.client(server.service.auth.create_token("dave")[1]) as dave:
        assert carol.post(f"/serving-endpoints/{limited}/invocations", json=ASK).status_code == 200
        outsider = dave.post(f"/serving-endpoints/{limited}/invocations", json=ASK)
        assert outsider.status_code == 403 and "needs CAN_QUERY" in outsider.json()["message"]
        admin.patch(f"{SCIM}/Groups/{group['id']}", json={"Operations": [
            {"op": "remove", "path": "members", "value": [{"value": "carol"}]}]}).raise_for_status()
        after = carol.post(f"/serving-endpoints/{limited}/invocations", json=ASK)
        assert after.status_code == 403 and "has no permission" in after.json()["message"]
    assert len(upstream.calls) == 1
    unknown = admin.patch(f"/api/2.0/permissions/serving-endpoints/{endpoint_id}", json={"access_control_list": [
        {"group_name": "no-such-group", "permission_level": "CAN_QUERY"}]})
    assert unknown.status_code == 400 and "'no-such-group' is not a group" in unknown.json()["message"]
    both = admin.patch(f"/api/2.0/permissions/serving-endpoints/{endpoint_id}", json={"access_control_list": [
        {"user_name": "x", "group_name": "scorers", "permission_level": "CAN_QUERY"}]})
    assert both.status_code == 400 and "exactly one of user_name, group_name or service_principal_name" in both.text


def test_a_service_principal_queries_with_its_own_token_and_permission(server, admin, limited):
    sp = admin.post(f"{SCIM}/ServicePrincipals", json={"displayName": "nightly-etl"}).json()
    assert sp["displayName"] == "nightly-etl" and len(sp["applicationId"]) == 36
    minted = admin.post("/api/2.0/token-management/on-behalf-of/tokens",
                        json={"application_id": sp["applicationId"], "comment": "etl", "lifetime_seconds": 3600}).json()
    assert minted["token_info"]["owner_id"] == sp["id"] and minted["token_info"]["expiry_time"] > 0
    with server.client(minted["token_value"]) as etl:
        assert etl.post(f"/serving-endpoints/{limited}/invocations", json=ASK).status_code == 403
        grant(admin, limited, {"service_principal_name": sp["applicationId"], "permission_level": "CAN_QUERY"})
        assert etl.post(f"/serving-endpoints/{limited}/invocations", json=ASK).status_code == 200
        endpoint_id = admin.get(f"/api/2.0/serving-endpoints/{limited}").json()["id"]
        acl = admin.get(f"/api/2.0/permissions/serving-endpoints/{endpoint_id}").json()["access_control_list"]
        assert {"service_principal_name": sp["applicationId"],
                "all_permissions": [{"permission_level": "CAN_QUERY", "inherited": False}]} in acl
        with server.client(server.service.auth.create_token("bob")[1]) as bob:
            refused = bob.post("/api/2.0/token-management/on-behalf-of/tokens", json={"application_id": sp["applicationId"]})
            assert refused.status_code == 403
        assert admin.delete(f"{SCIM}/ServicePrincipals/{sp['id']}").status_code == 204
        assert etl.post(f"/serving-endpoints/{limited}/invocations", json=ASK).status_code == 401


def test_limits_for_unknown_groups_or_without_a_principal_are_refused_by_name(admin, limited):
    no_principal = admin.put(f"/api/2.0/serving-endpoints/{limited}/ai-gateway", json={"rate_limits": [
        {"calls": 1, "key": "user_group", "renewal_period": "minute"}]})
    assert no_principal.status_code == 400 and "key 'user_group' needs principal" in no_principal.json()["message"]
    unknown = admin.put(f"/api/2.0/serving-endpoints/{limited}/ai-gateway", json={"rate_limits": [
        {"calls": 1, "key": "user_group", "principal": "ghosts", "renewal_period": "minute"}]})
    assert unknown.status_code == 400 and "rate_limits[0].principal: 'ghosts' is not a group" in unknown.json()["message"]
    unknown_sp = admin.put(f"/api/2.0/serving-endpoints/{limited}/ai-gateway", json={"rate_limits": [
        {"calls": 1, "key": "service_principal", "principal": "nope", "renewal_period": "minute"}]})
    assert unknown_sp.status_code == 400 and "'nope' is not a service principal" in unknown_sp.json()["message"]


def test_a_group_shares_one_budget_and_a_custom_user_limit_replaces_it(server, admin, limited, upstream):
    admin.post(f"{SCIM}/Groups", json={"displayName": "interns", "members": [{"value": "i1"}, {"value": "i2"}]})
    admin.put(f"/api/2.0/serving-endpoints/{limited}/ai-gateway", json={"rate_limits": [
        {"calls": 3, "key": "user_group", "principal": "interns", "renewal_period": "minute"},
        {"calls": 5, "key": "user", "principal": "i2", "renewal_period": "minute"},
        {"calls": 1, "key": "user", "renewal_period": "minute"}]}).raise_for_status()
    start_of_a_window()
    statuses = {}
    for user in ("i1", "i3", "i2"):
        grant(admin, limited, {"user_name": user, "permission_level": "CAN_QUERY"})
        with server.client(server.service.auth.create_token(user)[1]) as client:
            statuses[user] = [client.post(f"/serving-endpoints/{limited}/invocations", json=ASK).status_code
                              for _ in range(6)]
    assert statuses["i1"] == [200] * 3 + [429] * 3  # the group's 3, shared
    assert statuses["i3"] == [200] + [429] * 5  # not in the group: the default per-user 1
    assert statuses["i2"] == [200] * 5 + [429]  # a member with a custom limit: that, not the group's
    assert len(upstream.calls) == 9


def test_group_and_service_principal_limits_hold_across_two_server_processes(tmp_path, upstream):
    home = tmp_path / "home"
    service = EndpointService(home)
    service.create(external_endpoint("shared", upstream.url))
    service.wait_for_deployments()
    principals = service.auth.principals
    principals.create_group("team", ["m1", "m2"])
    robot = principals.create_service_principal("robot")
    service.put_ai_gateway("shared", {"rate_limits": [
        {"calls": 7, "key": "user_group", "principal": "team", "renewal_period": "minute"},
        {"calls": 4, "key": "service_principal", "principal": robot.application_id, "renewal_period": "minute"}]})
    endpoint_id = service.store.row("shared")["id"]
    service.set_permissions(endpoint_id, {"access_control_list": [
        {"group_name": "team", "permission_level": "CAN_QUERY"},
        {"service_principal_name": robot.application_id, "permission_level": "CAN_QUERY"}]}, replace=False)
    tokens = {"m1": service.auth.create_token("m1")[1], "m2": service.auth.create_token("m2")[1],
              "robot": service.auth.create_token(robot.application_id)[1]}

    with serve_processes(home, 2) as ports:
        start_of_a_window()

        def query(job: tuple[int, str]) -> tuple[str, int]:
            i, who = job
            url = f"http://127.0.0.1:{ports[i % 2]}/serving-endpoints/shared/invocations"
            response = httpx.post(url, json=ASK, headers={"Authorization": f"Bearer {tokens[who]}"}, timeout=30)
            return who, response.status_code

        jobs = [(i, ("m1", "m2", "robot")[i % 3]) for i in range(36)]
        with ThreadPoolExecutor(max_workers=12) as pool:
            answered = list(pool.map(query, jobs))
    team = [status for who, status in answered if who != "robot"]
    robot_statuses = [status for who, status in answered if who == "robot"]
    assert team.count(200) == 7 and team.count(429) == 17  # one budget for m1 and m2, over both processes
    assert robot_statuses.count(200) == 4 and robot_statuses.count(429) == 8
    assert len(upstream.calls) == 11


def test_scim_lists_page_and_filter_as_databricks_sdk_expects(server, admin):
    for name in ("alpha", "beta", "gamma"):
        admin.post(f"{SCIM}/Groups", json={"displayName": name}).raise_for_status()
    first = admin.get(f"{SCIM}/Groups", params={"startIndex": 1, "count": 2}).json()
    assert [g["displayName"] for g in first["Resources"]] == ["alpha", "beta"] and first["totalResults"] == 3
    last = admin.get(f"{SCIM}/Groups", params={"startIndex": 3, "count": 2}).json()
    assert [g["displayName"] for g in last["Resources"]] == ["gamma"]
    assert admin.get(f"{SCIM}/Groups", params={"startIndex": 4}).json()["Resources"] == []  # the SDK stops here
    found = admin.get(f"{SCIM}/Groups", params={"filter": 'displayName eq "beta"'}).json()
    assert [g["displayName"] for g in found["Resources"]] == ["beta"] and found["totalResults"] == 1
    bad = admin.get(f"{SCIM}/Groups", params={"filter": 'displayName co "a"'})
    assert bad.status_code == 400 and "sqlinfer filters by displayName or id only" in bad.json()["message"]


def test_a_name_is_either_a_users_or_a_groups(server, admin):
    server.service.auth.create_token("erin")
    clash = admin.post(f"{SCIM}/Groups", json={"displayName": "erin"})
    assert clash.status_code == 409 and "'erin' is a user's name" in clash.json()["message"]
    admin.post(f"{SCIM}/Groups", json={"displayName": "ops"}).raise_for_status()
    from serving.errors import InvalidParameterValue

    with pytest.raises(InvalidParameterValue, match="'ops' is a group's name"):
        server.service.auth.create_token("ops")


def test_a_limit_for_the_users_group_holds_for_everyone_together(server, admin, limited, upstream):
    admin.put(f"/api/2.0/serving-endpoints/{limited}/ai-gateway", json={"rate_limits": [
        {"calls": 2, "key": "user_group", "principal": "users", "renewal_period": "minute"}]}).raise_for_status()
    grant(admin, limited, {"group_name": "users", "permission_level": "CAN_QUERY"})
    start_of_a_window()
    statuses = []
    for user in ("u1", "u2", "u3"):
        with server.client(server.service.auth.create_token(user)[1]) as client:
            statuses.append(client.post(f"/serving-endpoints/{limited}/invocations", json=ASK).status_code)
    assert statuses == [200, 200, 429]


def test_legacy_limits_and_unknown_service_principals_are_refused_by_name(admin, limited, upstream):
    body = external_endpoint("legacy", upstream.url)
    body["rate_limits"] = [{"calls": 1, "key": "user_group", "principal": "x", "renewal_period": "minute"}]
    refused = admin.post("/api/2.0/serving-endpoints", json=body)
    assert refused.status_code == 400 and "rate_limits[0]: the legacy rate limits take" in refused.json()["message"]
    endpoint_id = admin.get(f"/api/2.0/serving-endpoints/{limited}").json()["id"]
    unknown = admin.patch(f"/api/2.0/permissions/serving-endpoints/{endpoint_id}", json={"access_control_list": [
        {"service_principal_name": "no-such-app", "permission_level": "CAN_QUERY"}]})
    assert unknown.status_code == 400 and "'no-such-app' is not a service principal's application_id" in unknown.text
