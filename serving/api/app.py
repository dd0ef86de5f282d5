"""The REST app: Databricks Model Serving's management, permissions, secrets and token APIs, the
query routes (Databricks and OpenAI), and sqlinfer's batch route for remote SQL engines.

It sits at the edge (only ``serving.api`` imports fastapi) and only assembles: one router per API
family (``endpoints``, ``permissions``, ``secrets``, ``tokens``, ``queries``, ``batch``, ``ops``),
the :class:`~serving.api.guard.Guard` in front of all of them (body limit, authentication before
any body is read, one error path that keeps connections alive), and the error handlers that map
every :class:`SqlinferError` to its status and code. Bodies are never logged: they may carry
secrets.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.api import (ai_functions, batch, endpoints, insights, openai_batches, ops, permissions, queries, scim, secrets,
                         statements, tokens, ui)
from serving.api.fast_lane import FastLane
from serving.api.guard import Guard, error_response
from serving.control.service import EndpointService
from serving.control.wire import describe_errors
from serving.data.batch_jobs import BatchStore
from serving.data.client import InProcessClient
from serving.data.directory import directory_for
from serving.data.result_store import default_store
from serving.data.usage import UsageRecorder
from serving.errors import InvalidParameterValue, MethodNotAllowed, NoSuchRoute, SqlinferError


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    """Blocking work (queries, registry writes) runs on at most SQLINFER_SERVE_THREADS threads
    (default 8). More threads do not answer faster on a small machine: they queue on the GIL,
    the HTTP connection pool's lock and SQLite. Measured with 32 concurrent clients on 2 cores:
    267 requests/s with Starlette's default 40 threads, 350 with 4 or 8, 298 with 16."""
    import anyio.to_thread

    anyio.to_thread.current_default_thread_limiter().total_tokens = int(os.environ.get("SQLINFER_SERVE_THREADS", "8"))
    app.state.service.start()  # deployments a restart interrupted
    import asyncio

    from serving.data.batch_runner import BatchWorker

    # batch jobs (OpenAI's Batch API): taken over from a previous server once their lease lapses
    batches = asyncio.create_task(BatchWorker(app.state.service, app.state.query_client).run())
    yield
    batches.cancel()
    # uvicorn ends a SIGTERM'd server by re-raising the signal, so atexit handlers never run:
    # without this, the vLLM EngineCore and workers outlive the server (seen: 3 GiB each) and the
    # last usage rows are lost. Shutdown is the last moment the process is ours. (An app embedded
    # in a larger process, as in the tests, leaves the process's engines alone.)
    from serving.data.upstream import close_sessions
    from serving.data.usage import flush_all

    await close_sessions()  # the pooled provider connections of this loop
    flush_all()
    engine_module = sys.modules.get("engine.vllm_engine") if app.state.owns_process else None
    if engine_module is not None:
        await run_in_threadpool(engine_module.shutdown_all)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class _CountRequests:
    """Requests by method and status for /metrics. Plain ASGI: Starlette's BaseHTTPMiddleware costs a
    task and a stream copy per request, a measurable share of the gateway's overhead."""

    def __init__(self, app, counts: dict):
        self.app, self.counts = app, counts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                method = scope["method"] if scope["method"] in _METHODS else "OTHER"  # no series per invented method
                key = (method, message["status"])
                self.counts[key] = self.counts.get(key, 0) + 1
            await send(message)

        await self.app(scope, receive, counting_send)


def serve_app() -> FastAPI:
    """The app of a `sqlinfer serve` process (uvicorn's factory for --workers): it owns the process."""
    return create_app(owns_process=True)


def create_app(service: EndpointService | None = None, owns_process: bool = False) -> FastAPI:
    service = service or EndpointService()
    app = FastAPI(title="sqlinfer", version="0.1.0", lifespan=_lifespan,
                  description="Databricks Model Serving compatible endpoint registry and query API.")
    app.state.service = service
    app.state.owns_process = owns_process  # stop the process's engines when the server stops
    app.state.query_client = InProcessClient(directory_for(service))
    app.state.usage = UsageRecorder(service.db)
    app.state.result_store = default_store()  # answers of SQL batches (serving.data.batches)
    app.state.request_counts = {}
    app.state.query_limiters = {}  # thread pools of queries (serving.api.queries.query_threads)
    app.state.statements = statements.Statements()  # SQL statements run for REST callers
    app.state.batch_store = BatchStore(service.db)  # OpenAI-compatible batch jobs (serving.data.batch_jobs)

    # Queries first: Starlette tries routes in order, and they are what the server answers most.
    for family in (queries, endpoints, permissions, secrets, tokens, scim, batch, ai_functions, statements, insights):
        app.include_router(family.router())
    app.include_router(scim.token_management_router())
    for prefix in openai_batches.PREFIXES:
        app.include_router(openai_batches.router(prefix))
    app.include_router(ops.router(started=time.time()))
    ui.mount(app)  # the Serving UI at / (static files; it reads the same REST API with the user's token)

    # Outermost first: count every response (401s included), then guard everything behind it,
    # then the fast lane of the hot query routes (serving.api.fast_lane), then FastAPI's routes.
    app.add_middleware(FastLane)
    app.add_middleware(Guard, authenticate=service.auth.authenticate)
    app.add_middleware(_CountRequests, counts=app.state.request_counts)

    @app.exception_handler(SqlinferError)
    async def sqlinfer_error(request: Request, exc: SqlinferError):
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = list(exc.errors())
        skip = 1 if errors and tuple(errors[0]["loc"])[:1] in (("body",), ("query",), ("path",)) else 0
        return error_response(InvalidParameterValue(describe_errors(errors, skip)), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        where = f"{request.method} {request.url.path}"
        if isinstance(exc.__cause__, SqlinferError):  # FastAPI wraps errors raised while reading a body
            return error_response(exc.__cause__, request.url.path)
        if exc.status_code == 404:
            error: SqlinferError = NoSuchRoute(f"no API at {where}; /docs lists the routes")
        elif exc.status_code == 405:
            error = MethodNotAllowed(f"{where} is not allowed; /docs lists each route's methods")
        else:
            error = SqlinferError(str(exc.detail))
            error.http_status = exc.status_code
        return error_response(error, request.url.path)

    return app
