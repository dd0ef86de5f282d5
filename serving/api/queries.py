"""The data-plane routes: ``/serving-endpoints/{name}/invocations`` and the OpenAI-compatible routes.

Querying needs CAN_QUERY (every user may query the system endpoints). The body is validated by its
type before anything runs; the call goes through the same serving client as the SQL functions.
REST callers get 429 + Retry-After at a rate limit (SQL jobs wait instead). ``stream: true``
answers server-sent events. The OpenAI routes answer errors in OpenAI's shape (the guard picks it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from serving.api.guard import JsonRoute, principal
from serving.control.auth import Principal
from serving.control.store import SYSTEM_PREFIX
from serving.data.invocations import invoke
from serving.data.limits import current_user, limit_mode
from serving.data.query_wire import ChatRequest, CompletionRequest, EmbeddingRequest, InvocationRequest, body_of
from serving.data.usage import request_context
from serving.errors import SqlinferError

log = logging.getLogger("sqlinfer.rest")


def may_query(request: Request, who: Principal, name: str) -> None:
    if not name.startswith(SYSTEM_PREFIX):  # every user may query the system endpoints
        service = request.app.state.service
        service.auth.require(who, service.endpoint_id(name), name, "CAN_QUERY")


def router() -> APIRouter:
    api = APIRouter(tags=["queries"], dependencies=[Depends(principal)], route_class=JsonRoute)

    def invoke_as(request: Request, who: Principal, name: str, payload: dict[str, Any], task: str | None):
        current_user.set(who.user_name)
        limit_mode.set("refuse")  # REST callers get 429 + Retry-After; SQL jobs wait instead
        request_context.set({"client_request_id": payload.get("client_request_id"), "usage_context": payload.get("usage_context")})
        return invoke(request.app.state.query_client, name, payload, task)

    async def answer(request: Request, who: Principal, name: str, payload: dict[str, Any], task: str | None) -> Response:
        await run_in_threadpool(may_query, request, who, name)
        if payload.get("stream"):
            return await stream(request, who, name, payload, task)
        result, served = await run_in_threadpool(invoke_as, request, who, name, payload, task)
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

        threading.Thread(target=produce, name=f"stream-{name}", daemon=True).start()
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

    @api.post("/serving-endpoints/{name}/invocations", summary="Query an endpoint (Databricks)")
    async def invocations(name: str, body: InvocationRequest, request: Request, who: Principal = Depends(principal)) -> Response:
        return await answer(request, who, name, body_of(body), None)

    @api.get("/serving-endpoints/{name}/metrics", summary="The endpoint's usage as Prometheus text (CAN_VIEW)",
             response_class=PlainTextResponse)
    def endpoint_metrics(name: str, request: Request, who: Principal = Depends(principal)) -> PlainTextResponse:
        service = request.app.state.service
        if name.startswith(SYSTEM_PREFIX):
            service.get(name, who)  # an unknown system name is a 404
        else:
            service.auth.require(who, service.endpoint_id(name), name, "CAN_VIEW")
        return PlainTextResponse(request.app.state.usage.prometheus(name), media_type="text/plain; version=0.0.4")

    return api
