"""The REST API, wire-compatible with Databricks Model Serving's management API and secrets API.

This module sits at the edge (only it imports fastapi). It authenticates, decodes JSON, calls
``serving.control.service.EndpointService`` and maps every :class:`SqlinferError` to Databricks' error
body ``{"error_code", "message"}`` with its HTTP status. Unexpected failures answer a generic
``INTERNAL_ERROR`` and are logged server-side with the request path only: bodies, which may
carry secrets, are never logged.

Unauthenticated routes: ``/health``, ``/metrics`` (Prometheus counters, no secrets),
``/openapi.json`` and ``/.well-known/databricks-config`` (404, which the Databricks SDK
probes before it sends a token).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import threading
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from starlette.concurrency import run_in_threadpool

from engine.types import SamplingOptions
from serving.control.auth import Principal
from serving.data.batch_wire import KINDS, encode_result
from serving.data.client import InProcessClient
from serving.control.service import SYSTEM_PREFIX, EndpointService
from serving.data.invocations import invoke
from serving.data.limits import current_user, limit_mode
from serving.data.usage import UsageRecorder, request_context
from serving.data.directory import directory_for
from serving.errors import InvalidParameterValue, MalformedRequest, SqlinferError
from serving.control.wire import CreateScope, DeleteScope, DeleteSecret, PutSecret, parse

log = logging.getLogger("sqlinfer.rest")
API = "/api/2.0"


def _retry_headers(exc: SqlinferError) -> dict[str, str]:
    """``Retry-After`` (whole seconds, at least 1) for errors that say when to come back."""
    seconds = getattr(exc, "retry_after_seconds", None)
    return {"Retry-After": str(max(1, round(seconds)))} if seconds is not None else {}


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    """Blocking work (queries, registry writes) runs on at most SQLINFER_SERVE_THREADS threads
    (default 8). More threads do not answer faster on a small machine: they queue on the GIL,
    the HTTP connection pool's lock and SQLite. Measured with 32 concurrent clients on 2 cores:
    267 requests/s with Starlette's default 40 threads, 350 with 4 or 8, 298 with 16."""
    import anyio.to_thread

    anyio.to_thread.current_default_thread_limiter().total_tokens = int(os.environ.get("SQLINFER_SERVE_THREADS", "8"))
    yield
    # uvicorn ends a SIGTERM'd server by re-raising the signal, so atexit handlers never run:
    # without this, the vLLM EngineCore and workers outlive the server (seen: 3 GiB each) and the
    # last usage rows are lost. Shutdown is the last moment the process is ours. (An app embedded
    # in a larger process, as in the tests, leaves the process's engines alone.)
    from serving.data.usage import flush_all

    flush_all()
    engine_module = sys.modules.get("engine.vllm_engine") if app.state.owns_process else None
    if engine_module is not None:
        await run_in_threadpool(engine_module.shutdown_all)


class _Wrap:
    """Adapts a function ``app -> app`` to Starlette's middleware constructor."""

    def __init__(self, app, wrap):
        self._app = wrap(app)

    async def __call__(self, scope, receive, send):
        await self._app(scope, receive, send)


def serve_app() -> FastAPI:
    """The app of a `sqlinfer serve` process (uvicorn's factory for --workers): it owns the process."""
    return create_app(owns_process=True)


def create_app(service: EndpointService | None = None, owns_process: bool = False) -> FastAPI:
    service = service or EndpointService()
    app = FastAPI(title="sqlinfer", version="0.1.0", lifespan=_lifespan,
                  description="Databricks Model Serving compatible endpoint registry and query API.")
    app.state.service = service
    app.state.owns_process = owns_process  # stop the process's engines when the server stops
    counters: dict[tuple[str, int], int] = {}
    started = time.time()

    def count_requests(inner):
        """Requests by method and status for /metrics. Plain ASGI: Starlette's BaseHTTPMiddleware
        costs a task and a stream copy per request, a measurable share of the gateway's overhead."""
        async def middleware(scope, receive, send):
            if scope["type"] != "http":
                return await inner(scope, receive, send)

            async def counting_send(message):
                if message["type"] == "http.response.start":
                    key = (scope["method"], message["status"])
                    counters[key] = counters.get(key, 0) + 1
                await send(message)

            await inner(scope, receive, counting_send)
        return middleware

    app.add_middleware(_Wrap, wrap=count_requests)

    @app.exception_handler(SqlinferError)
    async def sqlinfer_error(request: Request, exc: SqlinferError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.http_status, headers=_retry_headers(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error_code": "INVALID_PARAMETER_VALUE", "message": str(exc.errors()[0].get("msg"))}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "ENDPOINT_NOT_FOUND", 405: "BAD_REQUEST"}.get(exc.status_code, "BAD_REQUEST")
        message = f"no route for {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return JSONResponse({"error_code": code, "message": message}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s: %s", request.method, request.url.path, type(exc).__name__, exc_info=os.environ.get("SQLINFER_DEBUG_TRACEBACKS") == "1")
        return JSONResponse({"error_code": "INTERNAL_ERROR", "message": "internal error; see the server log"}, status_code=500)

    def principal(request: Request) -> Principal:
        return service.auth.authenticate(request.headers.get("authorization"))

    async def body(request: Request) -> Any:
        raw = await request.body()
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MalformedRequest(f"the request body is not valid JSON: {exc}") from None

    # -- unauthenticated -------------------------------------------------------------------

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "schema_version": service.db.schema_version}

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        lines = ["# HELP sqlinfer_http_requests_total HTTP requests answered, by method and status.",
                 "# TYPE sqlinfer_http_requests_total counter"]
        for (method, status), count in sorted(counters.items()):
            lines.append(f'sqlinfer_http_requests_total{{method="{method}",status="{status}"}} {count}')
        endpoints = service.db.read().execute("SELECT count(*) FROM endpoints").fetchone()[0]
        lines += ["# HELP sqlinfer_endpoints Endpoints in the registry (system endpoints excluded).",
                  "# TYPE sqlinfer_endpoints gauge", f"sqlinfer_endpoints {endpoints}",
                  "# HELP sqlinfer_uptime_seconds Seconds since the server started.",
                  "# TYPE sqlinfer_uptime_seconds gauge", f"sqlinfer_uptime_seconds {time.time() - started:.0f}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.get("/.well-known/databricks-config")
    def databricks_config() -> JSONResponse:
        return JSONResponse({"error_code": "ENDPOINT_NOT_FOUND", "message": "not a Databricks workspace"}, status_code=404)

    # -- serving endpoints -----------------------------------------------------------------

    endpoints = f"{API}/serving-endpoints"

    @app.post(endpoints)
    @app.post(endpoints + "/", include_in_schema=False)
    async def create_endpoint(request: Request) -> dict[str, Any]:
        who = principal(request)
        return service.create(await body(request), who)

    @app.get(endpoints)
    @app.get(endpoints + "/", include_in_schema=False)
    def list_endpoints(request: Request) -> dict[str, Any]:
        return {"endpoints": service.list(principal(request))}

    @app.get(endpoints + "/get-model-optimization-info/{model}/{version}")
    def optimization_info(model: str, version: str, request: Request) -> dict[str, Any]:
        principal(request)
        return service.optimization_info(model, version)

    @app.get(endpoints + "/{name}")
    def get_endpoint(name: str, request: Request) -> dict[str, Any]:
        return service.get(name, principal(request))

    @app.delete(endpoints + "/{name}")
    def delete_endpoint(name: str, request: Request) -> dict[str, Any]:
        service.delete(name, principal(request))
        return {}

    @app.put(endpoints + "/{name}/config")
    async def update_config(name: str, request: Request) -> dict[str, Any]:
        who = principal(request)
        return service.update_config(name, await body(request), who)

    @app.patch(endpoints + "/{name}/tags")
    async def patch_tags(name: str, request: Request) -> dict[str, Any]:
        who = principal(request)
        return {"tags": service.patch_tags(name, await body(request), who)}

    @app.put(endpoints + "/{name}/rate-limits")
    async def put_rate_limits(name: str, request: Request) -> dict[str, Any]:
        who = principal(request)
        return service.put_rate_limits(name, await body(request), who)

    @app.put(endpoints + "/{name}/ai-gateway")
    async def put_ai_gateway(name: str, request: Request) -> dict[str, Any]:
        who = principal(request)
        return service.put_ai_gateway(name, await body(request), who)

    # -- permissions -----------------------------------------------------------------------

    permissions = f"{API}/permissions/serving-endpoints/{{endpoint_id}}"

    @app.get(permissions)
    def get_permissions(endpoint_id: str, request: Request) -> dict[str, Any]:
        return service.permissions(endpoint_id, principal(request))

    @app.put(permissions)
    async def put_permissions(endpoint_id: str, request: Request) -> dict[str, Any]:
        who = principal(request)
        return service.set_permissions(endpoint_id, await body(request), replace=True, principal=who)

    @app.patch(permissions)
    async def patch_permissions(endpoint_id: str, request: Request) -> dict[str, Any]:
        who = principal(request)
        return service.set_permissions(endpoint_id, await body(request), replace=False, principal=who)

    # -- secrets (admins manage them: a secret is reachable from any endpoint config) -------

    def admin(request: Request) -> Principal:
        who = principal(request)
        if not who.is_admin:
            from serving.errors import PermissionDenied

            raise PermissionDenied(f"user {who.user_name!r} is not an admin; secrets are managed by admins "
                                   f"(`sqlinfer tokens create --user NAME --admin`)")
        return who

    @app.post(f"{API}/secrets/scopes/create")
    async def create_scope(request: Request) -> dict[str, Any]:
        admin(request)
        service.secrets.create_scope(parse(CreateScope, await body(request)).scope)
        return {}

    @app.get(f"{API}/secrets/scopes/list")
    def list_scopes(request: Request) -> dict[str, Any]:
        admin(request)
        return {"scopes": service.secrets.list_scopes()}

    @app.post(f"{API}/secrets/scopes/delete")
    async def delete_scope(request: Request) -> dict[str, Any]:
        admin(request)
        service.secrets.delete_scope(parse(DeleteScope, await body(request)).scope)
        return {}

    @app.post(f"{API}/secrets/put")
    async def put_secret(request: Request) -> dict[str, Any]:
        admin(request)
        secret = parse(PutSecret, await body(request))
        value = secret.string_value or secret.bytes_value
        service.secrets.put(secret.scope, secret.key, value.get_secret_value())
        return {}

    @app.get(f"{API}/secrets/list")
    def list_secrets(scope: str, request: Request) -> dict[str, Any]:
        admin(request)
        return {"secrets": service.secrets.list(scope)}

    @app.post(f"{API}/secrets/delete")
    async def delete_secret(request: Request) -> dict[str, Any]:
        admin(request)
        secret = parse(DeleteSecret, await body(request))
        service.secrets.delete(secret.scope, secret.key)
        return {}

    # -- queries (data plane) --------------------------------------------------------------

    query_client = InProcessClient(directory_for(service))

    def may_query(request: Request, name: str) -> Principal:
        who = principal(request)
        if not name.startswith(SYSTEM_PREFIX):  # every user may query the system endpoints
            service.auth.require(who, service.endpoint_id(name), name, "CAN_QUERY")
        return who

    def invoke_as(who: Principal, name: str, payload: dict[str, Any], task: str | None):
        current_user.set(who.user_name)
        limit_mode.set("refuse")  # REST callers get 429 + Retry-After; SQL jobs wait instead
        request_context.set({"client_request_id": payload.get("client_request_id"), "usage_context": payload.get("usage_context")})
        return invoke(query_client, name, payload, task)

    async def answer(who: Principal, name: str, payload: Any, task: str | None) -> Response:
        if not isinstance(payload, dict):
            raise MalformedRequest("the request body must be a JSON object")
        if payload.get("stream"):
            return await stream(who, name, payload, task)
        result, served = await run_in_threadpool(invoke_as, who, name, payload, task)
        served = served or name.removeprefix(SYSTEM_PREFIX)
        return JSONResponse(result, headers={"served-model-name": served})

    async def stream(who: Principal, name: str, payload: dict[str, Any], task: str | None) -> Response:
        """Server-sent events: OpenAI chunks as the model produces them, then ``data: [DONE]``.

        A thread runs the request (its user, limits and usage context set there) and hands
        chunks to the event loop. An error before the first chunk is an ordinary HTTP error;
        after it, an ``{"error": ...}`` event (what the OpenAI SDK raises on). If the client goes
        away, the request is closed, which aborts it inside the engine.
        """
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        gone = threading.Event()

        def produce() -> None:
            try:
                answer, _ = invoke_as(who, name, payload, task)
                events = answer.events
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
            except Exception as exc:
                log.error("internal error while streaming from %s: %s", name, type(exc).__name__)
                failure = SqlinferError("internal error while streaming; see the server log")
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

    def openai_route(task: str):
        async def route(request: Request) -> Response:
            try:
                payload = await body(request)
                name = payload.get("model") if isinstance(payload, dict) else None
                if not name:
                    raise MalformedRequest("'model' (the endpoint name) is required")
                return await answer(may_query(request, name), name, payload, task)
            except SqlinferError as exc:  # OpenAI's error shape, which the OpenAI SDK parses
                return JSONResponse({"error": {"message": exc.message, "type": exc.error_code.lower(), "code": exc.error_code}},
                                    status_code=exc.http_status, headers=_retry_headers(exc))
        return route

    app.post("/serving-endpoints/chat/completions")(openai_route("llm/v1/chat"))
    app.post("/serving-endpoints/completions")(openai_route("llm/v1/completions"))
    app.post("/serving-endpoints/embeddings")(openai_route("llm/v1/embeddings"))

    @app.post("/serving-endpoints/{name}/invocations")
    async def invocations(name: str, request: Request) -> Response:
        who = may_query(request, name)
        return await answer(who, name, await body(request), None)

    # -- batches from remote SQL engines (Spark executors): serving.data.batch_wire ---------------

    @app.get(f"{API}/sqlinfer/endpoints")
    def sql_endpoints(request: Request) -> dict[str, Any]:
        who = principal(request)
        visible = {view["name"] for view in service.list(who)}
        return {"endpoints": [{"name": n, "task": t} for n, t in query_client.endpoints() if n in visible]}

    @app.get(f"{API}/sqlinfer/endpoints/{{name}}")
    def sql_endpoint(name: str, request: Request) -> dict[str, Any]:
        may_query(request, name)
        task = query_client.task(name)
        dimension = query_client.embedding_dimension(name) if task == "llm/v1/embeddings" else None
        return {"name": name, "task": task, "embedding_dimension": dimension,
                "cache_version": query_client.config_version(name)}

    def run_batch(who: Principal, payload: dict[str, Any]) -> list[dict[str, Any]]:
        current_user.set(who.user_name)
        limit_mode.set("wait")  # a SQL job slows down under a rate limit instead of failing
        request_context.set({})  # recorded as source "sql"
        name, kind, requests = payload["endpoint"], payload["kind"], payload["requests"]
        if kind == "embed":
            results = query_client.embed(name, requests)
        elif kind == "predict":
            results = query_client.predict(name, requests, payload.get("params"))
        else:
            try:
                options = SamplingOptions(**(payload.get("options") or {}))
            except ValueError as exc:
                from serving.control.wire import describe_validation_error

                raise InvalidParameterValue(f"options: {describe_validation_error(exc)}") from None
            call = query_client.chat if kind == "chat" else query_client.complete
            results = call(name, requests, options)
        return [encode_result(r) for r in results]

    @app.post(f"{API}/sqlinfer/batch")
    async def batch(request: Request) -> JSONResponse:
        payload = await body(request)
        if not isinstance(payload, dict) or not isinstance(payload.get("endpoint"), str) \
                or payload.get("kind") not in KINDS or not isinstance(payload.get("requests"), list):
            raise MalformedRequest(f"a batch is {{\"endpoint\": name, \"kind\": one of {', '.join(KINDS)}, "
                                   f"\"requests\": [...], \"options\": {{...}}}}")
        who = may_query(request, payload["endpoint"])
        return JSONResponse({"results": await run_in_threadpool(run_batch, who, payload)})

    usage = UsageRecorder(service.db)

    @app.get("/serving-endpoints/{name}/metrics")
    def endpoint_metrics(name: str, request: Request) -> PlainTextResponse:
        who = principal(request)
        if not name.startswith(SYSTEM_PREFIX):
            service.auth.require(who, service.endpoint_id(name), name, "CAN_VIEW")
        else:
            service.get(name, who)  # an unknown system name is a 404
        return PlainTextResponse(usage.prometheus(name), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    def root() -> Response:
        return JSONResponse({"service": "sqlinfer", "docs": "/docs", "openapi": "/openapi.json"})

    return app
