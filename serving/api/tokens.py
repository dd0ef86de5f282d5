"""``/api/2.0/token``: the caller's own API tokens (Databricks' personal access tokens API).

A token is shown once, when created; only its hash is stored. A new token carries its creator's
rights (an admin's token makes admin tokens). Revoking works on the caller's own tokens only.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from serving.api.guard import JsonRoute, principal
from serving.control.auth import Principal
from serving.control.wire import CreateToken, RevokeToken


def _info(token: dict[str, Any]) -> dict[str, Any]:
    return {"token_id": token["id"], "creation_time": token["creation_timestamp"],
            "expiry_time": token["expiry_time"] if token["expiry_time"] is not None else -1, "comment": token["comment"] or ""}


def router() -> APIRouter:
    api = APIRouter(prefix="/api/2.0/token", tags=["tokens"], dependencies=[Depends(principal)], route_class=JsonRoute)

    @api.post("/create", summary="Create a token for the caller")
    def create_token(body: CreateToken, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        import time

        auth = request.app.state.service.auth
        lifetime = body.lifetime_seconds
        if who.expires_at_ms is not None:  # a token never outlives the token that made it
            remaining = max(1, int(who.expires_at_ms / 1000 - time.time()))
            lifetime = min(lifetime or remaining, remaining)
        token_id, value = auth.create_token(who.user_name, is_admin=who.is_admin, comment=body.comment,
                                            lifetime_seconds=lifetime)
        [info] = [t for t in auth.list_tokens(who.user_name) if t["id"] == token_id]
        return {"token_value": value, "token_info": _info(info)}

    @api.get("/list", summary="The caller's tokens (never their values)")
    def list_tokens(request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        return {"token_infos": [_info(t) for t in request.app.state.service.auth.list_tokens(who.user_name)]}

    @api.post("/delete", summary="Revoke one of the caller's tokens")
    def delete_token(body: RevokeToken, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        request.app.state.service.auth.revoke_token(body.token_id, who.user_name)
        return {}

    return api
