"""``/api/2.0/preview/scim/v2/Groups``, ``/ServicePrincipals`` and ``/Me``, and tokens for service principals.

Databricks' SCIM shapes, so ``WorkspaceClient().groups`` / ``.service_principals`` /
``.current_user.me()`` work unchanged. ``/Me`` tells any caller who they are (the Serving UI shows
it). Any authenticated caller may list and read groups and service principals (as in Databricks);
creating, changing and deleting them, and minting a service principal's tokens
(``POST /api/2.0/token-management/on-behalf-of/tokens``), need an admin. A member's ``value``
is a user name or a service principal's application id.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from serving.api.guard import JsonRoute, admin, principal
from serving.control.auth import ENTITLEMENTS, Principal
from serving.control.principals import Group, ServicePrincipal
from serving.errors import InvalidParameterValue

USER_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:Group"
SP_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:ServicePrincipal"
LIST_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:ListResponse"
PATCH_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:PatchOp"


class _Scim(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MemberRef(_Scim):
    value: str = Field(min_length=1, max_length=255)
    display: str | None = None
    ref: str | None = Field(default=None, alias="$ref")


class CreateGroup(_Scim):
    displayName: str
    members: list[MemberRef] | None = Field(default=None, max_length=10_000)
    schemas: list[str] | None = None
    entitlements: list[dict[str, Any]] | None = None  # refused by name when not empty
    roles: list[dict[str, Any]] | None = None
    externalId: str | None = None


class PatchOperation(_Scim):
    op: Literal["add", "remove", "replace", "Add", "Remove", "Replace"]
    path: str | None = None
    value: Any = None


class PatchGroup(_Scim):
    Operations: list[PatchOperation] = Field(max_length=1000)
    schemas: list[str] | None = None


class CreateServicePrincipal(_Scim):
    displayName: str
    active: bool | None = True
    applicationId: str | None = None  # Azure's; sqlinfer assigns its own
    schemas: list[str] | None = None
    entitlements: list[dict[str, Any]] | None = None
    externalId: str | None = None


class OnBehalfOfToken(_Scim):
    application_id: str
    lifetime_seconds: int | None = Field(default=None, ge=1, le=10 * 365 * 86400)
    comment: str | None = Field(default=None, max_length=1000)


def _group(group: Group) -> dict[str, Any]:
    return {"id": group.id, "displayName": group.name, "schemas": [GROUP_SCHEMA],
            "members": [{"value": member, "display": member} for member in group.members]}


def _sp(sp: ServicePrincipal) -> dict[str, Any]:
    return {"id": sp.id, "applicationId": sp.application_id, "displayName": sp.display_name, "active": sp.active,
            "schemas": [SP_SCHEMA]}


FILTER = re.compile(r'^\s*(\w+)\s+eq\s+"([^"]*)"\s*$')


@dataclass
class Page:
    """A SCIM list request: ``filter`` (``<attribute> eq "<value>"``), then ``startIndex`` (1-based)
    and ``count``. Clients page until a page comes back empty (databricks-sdk does). The other
    SCIM query parameters are accepted and do not change the answer."""

    filter: str | None = None
    startIndex: int = Query(1, ge=1)
    count: int | None = Query(None, ge=0, le=10_000)
    attributes: str | None = None
    excludedAttributes: str | None = None
    sortBy: str | None = None
    sortOrder: str | None = None

    def of(self, resources: list[dict[str, Any]], filterable: tuple[str, ...]) -> dict[str, Any]:
        if self.filter:
            matched = FILTER.match(self.filter)
            if matched is None or matched.group(1) not in filterable:
                raise InvalidParameterValue(f"filter {self.filter!r}: sqlinfer filters by {' or '.join(filterable)} "
                                            f"only, as '<attribute> eq \"<value>\"'")
            attribute, value = matched.groups()
            resources = [r for r in resources if str(r.get(attribute)) == value]
        rest = resources[self.startIndex - 1:]
        page = rest if self.count is None else rest[:self.count]
        return {"schemas": [LIST_SCHEMA], "totalResults": len(resources), "startIndex": self.startIndex,
                "itemsPerPage": len(page), "Resources": page}


def _members_in_path(path: str | None) -> str | None:
    """``members[value eq "alice"]`` -> ``alice`` (SCIM's filter for one member)."""
    if path and path.startswith("members[value eq ") and path.endswith("]"):
        return path[len("members[value eq "):-1].strip().strip('"')
    return None


def router() -> APIRouter:
    api = APIRouter(prefix="/api/2.0/preview/scim/v2", tags=["groups and service principals"],
                    dependencies=[Depends(principal)], route_class=JsonRoute)

    def directory(request: Request):
        return request.app.state.service.auth.principals

    # Declared first: no later route (``/Groups/{group_id}``, ``/ServicePrincipals/{sp_id}``) may take it.
    @api.get("/Me", summary="The calling user (databricks-sdk: w.current_user.me())")
    def me(request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        """Any authenticated caller, about themselves only: their name, groups (``users`` included),
        entitlements (an admin has them all) and whether they are an admin. A service principal's
        ``userName`` is its application id, as its tokens run as that."""
        auth = request.app.state.service.auth
        display = who.user_name
        if auth.principals.is_service_principal(who.user_name):
            display = auth.principals.service_principal_by_application(who.user_name).display_name
        entitlements = ENTITLEMENTS if who.is_admin else auth.entitlements(who.user_name)
        return {"schemas": [USER_SCHEMA], "id": who.user_name, "userName": who.user_name, "displayName": display,
                "active": True, "groups": [{"display": g, "value": g} for g in auth.principals.groups_of(who.user_name)],
                "entitlements": [{"value": e} for e in entitlements], "sqlinfer_is_admin": who.is_admin}

    @api.get("/Groups", summary="List groups")
    def list_groups(request: Request, page: Page = Depends()) -> dict[str, Any]:
        return page.of([_group(g) for g in directory(request).groups()], ("displayName", "id"))

    @api.post("/Groups", status_code=201, summary="Create a group (admins)", dependencies=[Depends(admin)])
    def create_group(body: CreateGroup, request: Request) -> dict[str, Any]:
        if body.entitlements or body.roles:
            raise InvalidParameterValue("entitlements and roles: grant entitlements to users with `sqlinfer users entitle`; "
                                        "groups carry permissions and rate limits only")
        return _group(directory(request).create_group(body.displayName, [m.value for m in body.members or []]))

    @api.get("/Groups/{group_id}", summary="Get a group")
    def get_group(group_id: str, request: Request) -> dict[str, Any]:
        return _group(directory(request).group(group_id))

    @api.patch("/Groups/{group_id}", summary="Add or remove members (admins)", dependencies=[Depends(admin)])
    def patch_group(group_id: str, body: PatchGroup, request: Request) -> dict[str, Any]:
        group = directory(request).group(group_id)
        add, remove = [], []
        for index, operation in enumerate(body.Operations):
            op = operation.op.lower()
            one = _members_in_path(operation.path)
            values = operation.value if isinstance(operation.value, list) else [operation.value] if operation.value else []
            refs = [v.get("value") if isinstance(v, dict) else None for v in values]
            if op == "remove" and one is not None:
                remove.append(one)
            elif op in ("add", "remove") and operation.path == "members" and refs and all(isinstance(r, str) for r in refs):
                (add if op == "add" else remove).extend(refs)
            elif op == "replace" and operation.path == "members" and all(isinstance(r, str) for r in refs):
                remove.extend(m for m in group.members if m not in refs)
                add.extend(refs)
            else:
                raise InvalidParameterValue(
                    f"Operations[{index}]: sqlinfer changes members only: {{op: add|remove|replace, path: members, "
                    f"value: [{{value: NAME}}]}} or {{op: remove, path: 'members[value eq \"NAME\"]'}}")
        return _group(directory(request).change_members(group.name, add=add, remove=remove))

    @api.delete("/Groups/{group_id}", status_code=204, summary="Delete a group (admins)", dependencies=[Depends(admin)])
    def delete_group(group_id: str, request: Request) -> Response:
        directory(request).delete_group(group_id)
        return Response(status_code=204)

    @api.get("/ServicePrincipals", summary="List service principals")
    def list_sps(request: Request, page: Page = Depends()) -> dict[str, Any]:
        return page.of([_sp(sp) for sp in directory(request).service_principals()], ("displayName", "applicationId", "id"))

    @api.post("/ServicePrincipals", status_code=201, summary="Create a service principal (admins)",
              dependencies=[Depends(admin)])
    def create_sp(body: CreateServicePrincipal, request: Request) -> dict[str, Any]:
        if body.applicationId is not None:
            raise InvalidParameterValue(f"applicationId {body.applicationId!r}: sqlinfer assigns the application id; "
                                        f"leave it out")
        if body.active is False or body.entitlements:
            raise InvalidParameterValue("active: false and entitlements: a service principal is active from creation "
                                        "(delete it to stop it) and gets entitlements with `sqlinfer users entitle`")
        return _sp(directory(request).create_service_principal(body.displayName))

    @api.get("/ServicePrincipals/{sp_id}", summary="Get a service principal")
    def get_sp(sp_id: str, request: Request) -> dict[str, Any]:
        return _sp(directory(request).service_principal(sp_id))

    @api.delete("/ServicePrincipals/{sp_id}", status_code=204, summary="Delete a service principal and its tokens (admins)",
                dependencies=[Depends(admin)])
    def delete_sp(sp_id: str, request: Request) -> Response:
        directory(request).delete_service_principal(sp_id)
        return Response(status_code=204)

    return api


def token_management_router() -> APIRouter:
    api = APIRouter(prefix="/api/2.0/token-management", tags=["tokens"], dependencies=[Depends(admin)],
                    route_class=JsonRoute)

    @api.post("/on-behalf-of/tokens", summary="Mint a token for a service principal (admins)")
    def on_behalf_of(body: OnBehalfOfToken, request: Request) -> dict[str, Any]:
        auth = request.app.state.service.auth
        sp = auth.principals.service_principal_by_application(body.application_id)
        lifetime = body.lifetime_seconds
        maker = request.state.principal
        if maker.expires_at_ms is not None:  # a token never outlives the token that made it
            remaining = max(1, int(maker.expires_at_ms / 1000 - time.time()))
            lifetime = min(lifetime or remaining, remaining)
        token_id, value = auth.create_token(sp.application_id, comment=body.comment, lifetime_seconds=lifetime)
        [info] = [t for t in auth.list_tokens(sp.application_id) if t["id"] == token_id]
        return {"token_value": value, "token_info": {
            "token_id": token_id, "creation_time": info["creation_timestamp"],
            "expiry_time": info["expiry_time"] if info["expiry_time"] is not None else -1, "comment": info["comment"] or "",
            "owner_id": sp.id, "created_by_username": request.state.principal.user_name}}

    return api
