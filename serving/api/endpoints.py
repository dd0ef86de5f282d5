"""``/api/2.0/serving-endpoints``: create, read, update and delete endpoints (Databricks' shapes).

Every route needs an authenticated principal (router dependency); the service checks the
permission each action needs (the ``create-serving-endpoints`` entitlement, CAN_VIEW, CAN_MANAGE).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from serving.api.guard import JsonRoute, principal
from serving.api.queries import endpoint_metrics_text, may_query, query_openapi
from serving.control.auth import Principal
from serving.control.wire import AiGatewayConfig, CreateEndpoint, EndpointConfig, PatchTags, PutRateLimits

PREFIX = "/api/2.0/serving-endpoints"


def router() -> APIRouter:
    api = APIRouter(prefix=PREFIX, tags=["serving endpoints"], dependencies=[Depends(principal)], route_class=JsonRoute)

    def service(request: Request) -> Any:
        return request.app.state.service

    @api.post("", summary="Create a serving endpoint")
    @api.post("/", include_in_schema=False)  # the MLflow deployments client posts with a trailing slash
    async def create_endpoint(body: CreateEndpoint, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        return await run_in_threadpool(service(request).create, body, who)

    @api.get("", summary="List the endpoints the caller may view")
    @api.get("/", include_in_schema=False)
    def list_endpoints(request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        return {"endpoints": service(request).list(who)}

    @api.get("/get-model-optimization-info/{model}/{version}", summary="Provisioned throughput chunk size of a model")
    def optimization_info(model: str, version: str, request: Request) -> dict[str, Any]:
        return service(request).optimization_info(model, version, request.state.principal)

    @api.get("/{name}/served-models/{served_model}/logs", summary="A served entity's server log (CAN_VIEW)")
    def logs(name: str, served_model: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        return {"logs": service(request).entity_logs(name, served_model, "server", who)}

    @api.get("/{name}/served-models/{served_model}/build-logs", summary="A served entity's deployment log (CAN_VIEW)")
    def build_logs(name: str, served_model: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        return {"logs": service(request).entity_logs(name, served_model, "build", who)}

    @api.get("/{name}/metrics", summary="The endpoint's metrics as Prometheus text (CAN_VIEW)", response_class=PlainTextResponse)
    def export_metrics(name: str, request: Request, who: Principal = Depends(principal)) -> PlainTextResponse:
        return endpoint_metrics_text(request, name, who)

    @api.get("/{name}/openapi", summary="An OpenAPI document for querying the endpoint (CAN_QUERY)")
    def openapi(name: str, request: Request, who: Principal = Depends(principal)) -> JSONResponse:
        may_query(request, who, name)
        task = request.app.state.query_client.task(name)
        return JSONResponse(query_openapi(name, task))

    @api.get("/{name}", summary="Get one endpoint")
    def get_endpoint(name: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        return service(request).get(name, who)

    @api.delete("/{name}", summary="Delete an endpoint")
    def delete_endpoint(name: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        service(request).delete(name, who)
        request.app.state.query_client.directory.forget(name)
        return {}

    @api.put("/{name}/config", summary="Update the served entities and traffic")
    def update_config(name: str, body: EndpointConfig, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        return service(request).update_config(name, body, who)

    @api.patch("/{name}/tags", summary="Add or delete tags")
    def patch_tags(name: str, body: PatchTags, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        return {"tags": service(request).patch_tags(name, body, who)}

    @api.put("/{name}/rate-limits", summary="Set rate limits (legacy form)")
    def put_rate_limits(name: str, body: PutRateLimits, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        return service(request).put_rate_limits(name, body, who)

    @api.put("/{name}/ai-gateway", summary="Set AI gateway settings")
    def put_ai_gateway(name: str, body: AiGatewayConfig, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        return service(request).put_ai_gateway(name, body, who)

    return api
