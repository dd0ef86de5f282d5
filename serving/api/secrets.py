"""``/api/2.0/secrets``: scopes, secrets (values never returned) and scope ACLs, as in Databricks.

Any user may create a scope and holds MANAGE on it; every other operation needs the permission
the secrets store checks (READ to list keys, WRITE to put or delete, MANAGE for ACLs and deletion).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request

from serving.api.guard import JsonRoute, principal
from serving.control.auth import Principal
from serving.control.wire import CreateScope, DeleteScope, DeleteSecret, DeleteSecretAcl, PutSecret, PutSecretAcl


def router() -> APIRouter:
    api = APIRouter(prefix="/api/2.0/secrets", tags=["secrets"], dependencies=[Depends(principal)], route_class=JsonRoute)

    def secrets(request: Request) -> Any:
        return request.app.state.service.secrets

    @api.post("/scopes/create", summary="Create a scope (the creator gets MANAGE)")
    def create_scope(body: CreateScope, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        secrets(request).create_scope(body.scope, who, body.initial_manage_principal)
        return {}

    @api.get("/scopes/list", summary="The scopes the caller may read")
    def list_scopes(request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        return {"scopes": secrets(request).list_scopes(who)}

    @api.post("/scopes/delete", summary="Delete a scope (MANAGE)")
    def delete_scope(body: DeleteScope, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        secrets(request).delete_scope(body.scope, who)
        return {}

    @api.post("/put", summary="Put a secret (WRITE); its value is never returned")
    def put_secret(body: PutSecret, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        value = body.string_value if body.string_value is not None else body.bytes_value
        secrets(request).put(body.scope, body.key, value.get_secret_value(), who)
        return {}

    @api.get("/list", summary="The keys of a scope (READ)")
    def list_secrets(request: Request, scope: str = Query(max_length=128), who: Principal = Depends(principal)) -> dict[str, Any]:
        return {"secrets": secrets(request).list(scope, who)}

    @api.post("/delete", summary="Delete a secret (WRITE)")
    def delete_secret(body: DeleteSecret, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        secrets(request).delete(body.scope, body.key, who)
        return {}

    @api.post("/acls/put", summary="Grant READ, WRITE or MANAGE on a scope (MANAGE)")
    def put_acl(body: PutSecretAcl, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        secrets(request).put_acl(body.scope, body.principal, body.permission, who)
        return {}

    @api.post("/acls/delete", summary="Remove a principal's ACL entry (MANAGE)")
    def delete_acl(body: DeleteSecretAcl, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        secrets(request).delete_acl(body.scope, body.principal, who)
        return {}

    @api.get("/acls/get", summary="One principal's permission on a scope (MANAGE)")
    def get_acl(request: Request, scope: str = Query(max_length=128), principal_name: str = Query(alias="principal", max_length=255),
                who: Principal = Depends(principal)) -> dict[str, Any]:
        return secrets(request).get_acl(scope, principal_name, who)

    @api.get("/acls/list", summary="A scope's ACL (MANAGE)")
    def list_acls(request: Request, scope: str = Query(max_length=128), who: Principal = Depends(principal)) -> dict[str, Any]:
        return {"items": secrets(request).list_acls(scope, who)}

    return api
