"""The data-plane routes: ``/serving-endpoints/{name}/invocations`` and the OpenAI-compatible routes.

Querying needs CAN_QUERY (every user may query the system endpoints). The body is validated by its
type before anything runs; the call goes through the same serving client as the SQL functions.
REST callers get 429 + Retry-After at a rate limit (SQL jobs wait instead). ``stream: true``
answers server-sent events. The OpenAI routes answer errors in OpenAI's shape (the guard picks it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
import threading
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from serving.api.guard import JsonRoute, principal
from serving.control.auth import Principal
from serving.control.generation import NotCached, memory_only
from serving.control.store import SYSTEM_PREFIX
from serving.data.batch_runner import require_query
from serving.data.invocations import ainvoke, invoke
from serving.data.limits import current_user, limit_mode
from serving.data.query_wire import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    InvocationRequest,
    ResponsesRequest,
    body_of,
)
from serving.data.responses import respond, respond_stream
from serving.data.usage import request_context
from serving.errors import ResourceDoesNotExist, SqlinferError

RESPONSES = "responses"  # the Responses API: answered by the chat path (serving.data.responses)

log = logging.getLogger("sqlinfer.rest")


def may_query(request: Request, who: Principal, name: str) -> None:
    """CAN_QUERY on ``name`` (``serving.data.batch_runner.require_query``: the one rule, which the
    batch worker applies too)."""
    require_query(request.app.state.service, request.app.state.query_client.directory, who, name)


@dataclasses.dataclass(frozen=True)
class QueryTarget:
    """What a query resolved to: the endpoint's backend and task, and whether the backend's
    whole chain answers on the event loop (``native_async``: the fast path)."""

    backend: Any
    task: str

    @property
    def fast(self) -> bool:
        return bool(self.backend.native_async)


def resolve(request: Request, who: Principal, name: str, build: bool) -> QueryTarget:
    """CAN_QUERY on ``name`` checked, then its backend. Without ``build``, a backend not built yet
    raises NotCached (building one may read the registry: the caller does it on a thread)."""
    may_query(request, who, name)
    directory = request.app.state.query_client.directory
    endpoint = directory.endpoint(name)
    if endpoint.backend is not None:  # the hot path: built already, no second lookup
        return QueryTarget(endpoint.backend, endpoint.task)
    if not build:
        raise NotCached(name)
    return QueryTarget(directory.backend(name), endpoint.task)


async def resolved(request: Request, who: Principal, name: str) -> QueryTarget:
    """:func:`resolve` from memory on the hot path; the first request after a registry change (or
    to a backend not built yet) reads the registry on a worker thread."""
    try:
        with memory_only():
            return resolve(request, who, name, build=False)
    except NotCached:
        return await run_in_threadpool(resolve, request, who, name, True)


async def answer_on_loop(target: QueryTarget, who: Principal, name: str, payload: dict[str, Any],
                         task: str | None) -> Response:
    """The fast path: a query that is not streamed, to a backend whose whole chain is async,
    answered on the event loop (no thread, no SQLite: usage rows are queued, limits cached)."""
    as_rest_caller(who, {"client_request_id": payload.get("client_request_id"), "usage_context": payload.get("usage_context")})
    result, served = await ainvoke(target.backend, name, target.task, payload, task)
    return JSONResponse(result, headers={"served-model-name": served or name.removeprefix(SYSTEM_PREFIX)})


def as_rest_caller(who: Principal, context: dict[str, Any]) -> None:
    """Set up this thread's request as a REST query: whose limits and usage rows, 429 + Retry-After
    at a limit (SQL jobs wait instead), and the caller's usage context (recorded as source "rest")."""
    current_user.set(who.user_name)
    limit_mode.set("refuse")
    request_context.set(context)


def as_sql_caller(who: Principal) -> None:
    """Set up this thread's calls as a SQL job's (a Spark batch, a statement run on the server):
    whose limits and usage rows, waiting for the next window at a rate limit instead of failing,
    and no REST context (recorded as source "sql")."""
    current_user.set(who.user_name)
    limit_mode.set("wait")
    request_context.set({})


def query_threads(request: Request, name: str) -> "anyio.CapacityLimiter":
    """The threads a query waits for its answer on (a thread per query in flight).

    Queries never take the threads of the control plane (a flood of model calls would otherwise
    stall listing endpoints), and each provisioned endpoint has threads of its own, so a flood of
    pay-per-token requests, which hold their threads while the shared engine works through
    them, cannot keep a provisioned endpoint's requests from reaching its engine (measured on 2
    cores: with one pool of 8 threads, 24 flooding callers cut a provisioned endpoint to a fifth).
    ``SQLINFER_QUERY_THREADS`` (default 8) sizes the pay-per-token pool and each provisioned one.
    """
    limiters = request.app.state.query_limiters
    key = "pay-per-token"
    if not name.startswith(SYSTEM_PREFIX):
        try:
            entities = request.app.state.service.serving(name).config.get("served_entities") or []
        except SqlinferError:  # not ready, or gone: the query itself will say so
            entities = []
        if any(entity.get("_provisioned_units") for entity in entities):
            key = f"provisioned:{name}"
    limiter = limiters.get(key)
    if limiter is None:
        limiter = limiters.setdefault(key, anyio.CapacityLimiter(int(os.environ.get("SQLINFER_QUERY_THREADS", "8"))))
    return limiter


def router() -> APIRouter:
    api = APIRouter(tags=["queries"], dependencies=[Depends(principal)], route_class=JsonRoute)

    def invoke_as(request: Request, who: Principal, name: str, payload: dict[str, Any], task: str | None):
        as_rest_caller(who, {"client_request_id": payload.get("client_request_id"), "usage_context": payload.get("usage_context")})
        client = request.app.state.query_client
        if task == RESPONSES:
            return (respond_stream(client, name, payload), None) if payload.get("stream") else respond(client, name, payload)
        return invoke(client, name, payload, task)

    async def answer(request: Request, who: Principal, name: str, payload: dict[str, Any], task: str | None) -> Response:
        target = await resolved(request, who, name)
        if target.fast and not payload.get("stream") and task != RESPONSES:
            return await answer_on_loop(target, who, name, payload, task)
        if payload.get("stream"):
            return await stream(request, who, name, payload, task)
        limiter = await run_in_threadpool(query_threads, request, name)  # the threaded path: SDKs, engines, guardrails
        result, served = await anyio.to_thread.run_sync(
            functools.partial(invoke_as, request, who, name, payload, task), limiter=limiter)
        return JSONResponse(result, headers={"served-model-name": served or name.removeprefix(SYSTEM_PREFIX)})

    async def stream(request: Request, who: Principal, name: str, payload: dict[str, Any], task: str | None) -> Response:
        """Server-sent events: OpenAI chunks as the model produces them, then ``data: [DONE]``.

        A thread runs the request (its user, limits and usage context set there) and hands chunks
        to the event loop. An error before the first chunk is an ordinary HTTP error; after it, an
        ``{"error": ...}`` event (what the OpenAI SDK raises on). If the client goes away, the
        request is closed, which aborts it inside the engine.
        """
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        gone = threading.Event()

        def produce() -> None:
            try:
                streamed, _ = invoke_as(request, who, name, payload, task)
                events = streamed.events
                try:
                    for event, served in events:
                        loop.call_soon_threadsafe(pieces.put_nowait, ("event", event, served))
                        if gone.is_set():
                            break
                finally:
                    events.close()
                loop.call_soon_threadsafe(pieces.put_nowait, ("done", None, None))
            except SqlinferError as exc:
                loop.call_soon_threadsafe(pieces.put_nowait, ("error", exc, None))
            except Exception as exc:  # noqa: BLE001  (a bug: reported as such, logged without the body)
                log.error("internal error while streaming from %s: %s", name, type(exc).__name__)
                failure = SqlinferError("internal error in sqlinfer while streaming; the server log has the details")
                loop.call_soon_threadsafe(pieces.put_nowait, ("error", failure, None))

        # on the query's own threads, as non-streamed queries: a flood of streams cannot take a
        # provisioned endpoint's threads, nor start a thread per request without bound
        limiter = await run_in_threadpool(query_threads, request, name)
        producing = asyncio.ensure_future(anyio.to_thread.run_sync(produce, limiter=limiter))
        producing.add_done_callback(lambda task: task.cancelled() or task.exception())  # errors are queued by produce
        first = await pieces.get()
        if first[0] == "error":
            raise first[1]

        async def sse():
            kind, value, _ = first
            try:
                while True:
                    if kind == "event":
                        yield f"data: {json.dumps(value)}\n\n"
                    elif kind == "done":
                        yield "data: [DONE]\n\n"
                        return
                    else:
                        error = {"message": value.message, "type": value.error_code.lower(), "code": value.error_code}
                        yield f"data: {json.dumps({'error': error})}\n\n"
                        return
                    kind, value, _ = await pieces.get()
            finally:
                gone.set()

        served = first[2] or name.removeprefix(SYSTEM_PREFIX)
        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"served-model-name": served, "Cache-Control": "no-cache"})

    @api.post("/serving-endpoints/chat/completions", summary="OpenAI chat completions (model = endpoint name)")
    async def chat_completions(body: ChatRequest, request: Request, who: Principal = Depends(principal)) -> Response:
        return await answer(request, who, body.model, body_of(body), "llm/v1/chat")

    @api.post("/serving-endpoints/completions", summary="OpenAI completions (model = endpoint name)")
    async def completions(body: CompletionRequest, request: Request, who: Principal = Depends(principal)) -> Response:
        return await answer(request, who, body.model, body_of(body), "llm/v1/completions")

    @api.post("/serving-endpoints/embeddings", summary="OpenAI embeddings (model = endpoint name)")
    async def embeddings(body: EmbeddingRequest, request: Request, who: Principal = Depends(principal)) -> Response:
        return await answer(request, who, body.model, body_of(body), "llm/v1/embeddings")

    @api.post("/serving-endpoints/responses", summary="OpenAI Responses API on a chat endpoint (model = endpoint name)")
    async def responses(body: ResponsesRequest, request: Request, who: Principal = Depends(principal)) -> Response:
        return await answer(request, who, body.model, body_of(body), RESPONSES)

    @api.get("/serving-endpoints/models", summary="The endpoints the caller may query, as OpenAI models")
    def list_models(request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        return {"object": "list", "data": [_model(view) for view in queryable(request, who)]}

    @api.get("/serving-endpoints/models/{model_id:path}", summary="One endpoint the caller may query, as an OpenAI model")
    def get_model(model_id: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        from urllib.parse import unquote

        name = unquote(model_id)
        for view in queryable(request, who):
            if view["name"] == name:
                return _model(view)
        raise ResourceDoesNotExist(f"model {name!r} is not an endpoint you may query; GET /serving-endpoints/models lists them")

    @api.post("/serving-endpoints/{name}/invocations", summary="Query an endpoint (Databricks)")
    async def invocations(name: str, body: InvocationRequest, request: Request, who: Principal = Depends(principal)) -> Response:
        return await answer(request, who, name, body_of(body), None)

    @api.get("/serving-endpoints/{name}/metrics", summary="The endpoint's usage as Prometheus text (CAN_VIEW)",
             response_class=PlainTextResponse)
    def endpoint_metrics(name: str, request: Request, who: Principal = Depends(principal)) -> PlainTextResponse:
        return endpoint_metrics_text(request, name, who)

    return api


def queryable(request: Request, who: Principal) -> list[dict[str, Any]]:
    """The endpoints ``who`` may query (system endpoints, and CAN_QUERY or more), ready or not."""
    return [view for view in request.app.state.service.list(who)
            if view.get("permission_level") in ("CAN_QUERY", "CAN_MANAGE") and view["state"]["ready"] == "READY"]


def _model(view: dict[str, Any]) -> dict[str, Any]:
    return {"id": view["name"], "object": "model", "created": int(view.get("creation_timestamp", 0) / 1000),
            "owned_by": view.get("creator") or "sqlinfer"}


def may_view(request: Request, who: Principal, name: str) -> str:
    """CAN_VIEW on ``name`` (every user may view the system endpoints); its endpoint id. An unknown
    name is a 404, a name the caller may not view a 403."""
    service = request.app.state.service
    if name.startswith(SYSTEM_PREFIX):
        service.get(name, who)  # an unknown system name is a 404
        return name
    endpoint_id = service.endpoint_id(name)
    service.auth.require(who, endpoint_id, name, "CAN_VIEW")
    return endpoint_id


def endpoint_metrics_text(request: Request, name: str, who: Principal) -> PlainTextResponse:
    """Requests, errors, latency, tokens and requests in flight of one endpoint (CAN_VIEW)."""
    may_view(request, who, name)
    return PlainTextResponse(request.app.state.usage.prometheus(name), media_type="text/plain; version=0.0.4")


def query_openapi(name: str, task: str) -> dict[str, Any]:
    """An OpenAPI 3 document for ``POST /serving-endpoints/{name}/invocations`` with the body of
    the endpoint's task (what Databricks' ``GET .../openapi`` gives a client generator)."""
    from serving.data.query_wire import ChatRequest, CompletionRequest, EmbeddingRequest, InvocationRequest

    model = {"llm/v1/chat": ChatRequest, "llm/v1/completions": CompletionRequest,
             "llm/v1/embeddings": EmbeddingRequest}.get(task, InvocationRequest)
    schema = model.model_json_schema()
    schema.get("properties", {}).pop("model", None)
    if "required" in schema:
        schema["required"] = [field for field in schema["required"] if field != "model"]
    return {"openapi": "3.1.0", "info": {"title": f"{name} serving endpoint", "version": "1"},
            "paths": {f"/serving-endpoints/{name}/invocations": {"post": {
                "summary": f"Query {name} ({task})",
                "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
                "responses": {"200": {"description": "the answer (an OpenAI object, or {\"predictions\": ...})"}}}}}}
