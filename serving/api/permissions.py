"""``/api/2.0/permissions/serving-endpoints/{id}``: who may view, query or manage an endpoint."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from serving.api.guard import JsonRoute, principal
from serving.control.auth import Principal
from serving.control.wire import AccessControlList


def router() -> APIRouter:
    api = APIRouter(prefix="/api/2.0/permissions/serving-endpoints", tags=["permissions"],
                    dependencies=[Depends(principal)], route_class=JsonRoute)

    @api.get("/{endpoint_id}/permissionLevels", summary="The permission levels an endpoint has")
    def permission_levels(endpoint_id: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        return request.app.state.service.permission_levels(endpoint_id, who)

    @api.get("/{endpoint_id}", summary="The endpoint's access control list")
    def get_permissions(endpoint_id: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        return request.app.state.service.permissions(endpoint_id, who)

    @api.put("/{endpoint_id}", summary="Replace the endpoint's direct permissions")
    def put_permissions(endpoint_id: str, body: AccessControlList, request: Request,
                        who: Principal = Depends(principal)) -> dict[str, Any]:
        return request.app.state.service.set_permissions(endpoint_id, body, replace=True, principal=who)

    @api.patch("/{endpoint_id}", summary="Add or change permissions")
    def patch_permissions(endpoint_id: str, body: AccessControlList, request: Request,
                          who: Principal = Depends(principal)) -> dict[str, Any]:
        return request.app.state.service.set_permissions(endpoint_id, body, replace=False, principal=who)

    return api
