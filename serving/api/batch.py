"""``/api/2.0/sqlinfer/...``: whole batches from remote SQL engines (Spark executors), a sqlinfer extension.

A batch is one request per Arrow batch, never one per row (``serving.data.batch_wire``); it needs
CAN_QUERY on its endpoint. With ``"stream": true`` every answer is sent as it completes and the
batch is cancelled when the client goes away; deterministic answers are also kept in the server's
result store (``serving.data.batches``), so a killed job's re-run pays for nothing twice. Over a
rate limit a batch waits for the next window instead of failing, as SQL jobs do in-process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from engine.types import SamplingOptions
from serving.api.guard import JsonRoute, principal
from serving.api.queries import as_sql_caller, may_query
from serving.control.auth import Principal
from serving.control.wire import BatchRequest, describe_validation_error
from serving.data.batch_wire import encode_result
from serving.data.batches import run_batch
from serving.data.usage import ai_function
from serving.errors import InvalidParameterValue, SqlinferError

log = logging.getLogger("sqlinfer.rest")


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

    def options_of(body: BatchRequest) -> SamplingOptions | None:
        if body.kind not in ("chat", "complete"):
            return None
        if (body.options or {}).get("tools"):
            raise InvalidParameterValue("options.tools: a SQL batch answers text; send tool calls to the chat routes")
        try:
            return SamplingOptions(**(body.options or {}))
        except ValueError as exc:
            raise InvalidParameterValue(f"options: {describe_validation_error(exc)}") from None

    def answer(request: Request, who: Principal, body: BatchRequest, emit, cancel=None) -> None:
        may_query(request, who, body.endpoint)
        as_sql_caller(who)
        ai_function.set(body.function)
        run_batch(request.app.state.query_client, request.app.state.result_store, body.endpoint, body.kind,
                  body.requests, options_of(body), body.params, emit, cancel)

    @api.post("/batch", summary="Answer one batch of requests of one kind (CAN_QUERY)")
    async def batch(body: BatchRequest, request: Request, who: Principal = Depends(principal)) -> Response:
        if body.stream:
            return await _streamed(request, who, body, answer)
        results: list[Any] = [None] * len(body.requests)

        def collect(index: int, result: Any) -> None:
            results[index] = result

        await run_in_threadpool(answer, request, who, body, collect)
        return JSONResponse({"results": [encode_result(r) for r in results]})

    return api


async def _streamed(request: Request, who: Principal, body: BatchRequest, answer) -> Response:
    """NDJSON, one line per answer as it completes; the batch is cancelled if the client leaves.

    Errors that refuse the batch before any answer (permission, a bad option) are ordinary HTTP
    errors; one that ends it later is an ``{"error": ...}`` line.
    """
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()
    await run_in_threadpool(may_query, request, who, body.endpoint)  # refused before the stream opens

    def emit(index: int, result: Any) -> None:
        line = json.dumps({"index": index, "result": encode_result(result)}, separators=(",", ":")) + "\n"
        loop.call_soon_threadsafe(lines.put_nowait, line)

    def produce() -> None:
        try:
            answer(request, who, body, emit, cancel)
            final = {"done": True}
        except SqlinferError as exc:
            final = {"error": exc.to_dict() | {"http_status": exc.http_status}}
        except Exception as exc:  # noqa: BLE001  (a bug: the client hears of it as one)
            log.error("internal error in a streamed batch for %s: %s", body.endpoint, type(exc).__name__)
            final = {"error": {"error_code": "INTERNAL_ERROR", "http_status": 500,
                               "message": "internal error in sqlinfer; the server log has the details"}}
        loop.call_soon_threadsafe(lines.put_nowait, json.dumps(final) + "\n")
        loop.call_soon_threadsafe(lines.put_nowait, None)

    threading.Thread(target=produce, name=f"batch-{body.endpoint}", daemon=True).start()

    async def stream():
        try:
            while (line := await lines.get()) is not None:
                yield line
        finally:
            cancel.set()  # finished, or the client went away: start nothing more for it

    return StreamingResponse(stream(), media_type="application/x-ndjson")
