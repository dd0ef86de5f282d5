"""``/api/2.0/sqlinfer/...``: whole batches from remote SQL engines (Spark executors), a sqlinfer extension.

A batch is one request per Arrow batch, never one per row (``serving.data.batch_wire``); it needs
CAN_QUERY on its endpoint. Over a rate limit a batch waits for the next window instead of failing,
as SQL jobs do in-process.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from engine.types import SamplingOptions
from serving.api.guard import JsonRoute, principal
from serving.api.queries import may_query
from serving.control.auth import Principal
from serving.control.wire import BatchRequest, describe_validation_error
from serving.data.batch_wire import encode_result
from serving.data.limits import current_user, limit_mode
from serving.data.usage import request_context
from serving.errors import InvalidParameterValue


def router() -> APIRouter:
    api = APIRouter(prefix="/api/2.0/sqlinfer", tags=["sql batches"], dependencies=[Depends(principal)], route_class=JsonRoute)

    @api.get("/endpoints", summary="Endpoints the caller may view, with their task")
    def sql_endpoints(request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        visible = {view["name"] for view in request.app.state.service.list(who)}
        client = request.app.state.query_client
        return {"endpoints": [{"name": n, "task": t} for n, t in client.endpoints() if n in visible]}

    @api.get("/endpoints/{name}", summary="An endpoint's task, embedding dimension and cache version (CAN_QUERY)")
    def sql_endpoint(name: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        may_query(request, who, name)
        client = request.app.state.query_client
        task = client.task(name)
        dimension = client.embedding_dimension(name) if task == "llm/v1/embeddings" else None
        return {"name": name, "task": task, "embedding_dimension": dimension, "cache_version": client.config_version(name)}

    def run_batch(request: Request, who: Principal, body: BatchRequest) -> list[dict[str, Any]]:
        may_query(request, who, body.endpoint)
        current_user.set(who.user_name)
        limit_mode.set("wait")  # a SQL job slows down under a rate limit instead of failing
        request_context.set({})  # recorded as source "sql"
        client = request.app.state.query_client
        if body.kind == "embed":
            results = client.embed(body.endpoint, body.requests)
        elif body.kind == "predict":
            results = client.predict(body.endpoint, body.requests, body.params)
        else:
            try:
                options = SamplingOptions(**(body.options or {}))
            except ValueError as exc:
                raise InvalidParameterValue(f"options: {describe_validation_error(exc)}") from None
            call = client.chat if body.kind == "chat" else client.complete
            results = call(body.endpoint, body.requests, options)
        return [encode_result(r) for r in results]

    @api.post("/batch", summary="Answer one batch of requests of one kind (CAN_QUERY)")
    async def batch(body: BatchRequest, request: Request, who: Principal = Depends(principal)) -> JSONResponse:
        return JSONResponse({"results": await run_in_threadpool(run_batch, request, who, body)})

    return api
