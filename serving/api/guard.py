"""What every request passes before any route runs: size limit, authentication, and one error path.

Why a raw ASGI middleware and not only FastAPI dependencies: FastAPI reads and decodes a route's
JSON body *before* it solves the route's dependencies, so an anonymous caller's malformed or huge
body would be parsed (and answered 400 or 500) before anyone asked who they are. Here, in order:

1. the body is limited (``SQLINFER_MAX_BODY_BYTES``, 32 MiB): a larger ``Content-Length`` is
   refused with 413 before a byte is read, and a chunked body is cut off when it passes the limit;
2. every path not in :data:`PUBLIC_PATHS` (or under :data:`PUBLIC_PREFIXES`) needs ``Authorization: Bearer <token>``: the principal
   is put in ``request.state.principal`` or the request ends with 401 (unknown paths included, so
   an anonymous caller learns nothing about what exists);
3. any exception that escapes a route becomes an error response in the route's shape (Databricks'
   ``{"error_code", "message"}``, or OpenAI's ``{"error": {...}}`` on the OpenAI routes) *inside*
   this middleware, so the server never drops the keep-alive connection after a 500 (Starlette's
   own last-resort handler re-raises, and uvicorn then closes the connection).

Routers then declare :func:`principal` (and permission checks) as dependencies: a route cannot be
reached without one, and :func:`principal` refuses a request the middleware did not authenticate.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from serving.control.auth import Principal
from serving.control.generation import NotCached, memory_only
from serving.errors import MalformedRequest, PermissionDenied, RequestTooLarge, SqlinferError, Unauthenticated

log = logging.getLogger("sqlinfer.rest")

# The only routes anyone may call without a token. /metrics joins them unless
# SQLINFER_METRICS_AUTH=token (it holds request counts by method and status, the number of
# endpoints and the uptime: no names, no payloads, no secrets).
PUBLIC_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc",
                          "/.well-known/databricks-config", "/"})
# The Serving UI's static files (HTML, JS, CSS: no data; the page asks for a token and then calls
# the REST API like any client).
PUBLIC_PREFIXES = ("/ui/",)
OPENAI_PREFIXES = ("/serving-endpoints/chat/", "/serving-endpoints/completions", "/serving-endpoints/embeddings",
                   "/serving-endpoints/models", "/serving-endpoints/responses", "/serving-endpoints/files",
                   "/serving-endpoints/batches", "/v1/")
MAX_JSON_DEPTH = 64


def max_body_bytes() -> int:
    return int(os.environ.get("SQLINFER_MAX_BODY_BYTES", str(32 * 1024 * 1024)))


def public_paths() -> frozenset[str]:
    if os.environ.get("SQLINFER_METRICS_AUTH", "").lower() == "token":
        return PUBLIC_PATHS
    return PUBLIC_PATHS | {"/metrics"}


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PREFIXES)


def retry_headers(exc: SqlinferError) -> dict[str, str]:
    """``Retry-After`` (whole seconds, at least 1) for errors that say when to come back."""
    seconds = getattr(exc, "retry_after_seconds", None)
    return {"Retry-After": str(max(1, round(seconds)))} if seconds is not None else {}


def error_response(exc: SqlinferError, path: str) -> JSONResponse:
    """``exc`` in the shape the route's clients parse: OpenAI's on the OpenAI routes, else Databricks'."""
    if is_openai_path(path):
        body: dict[str, Any] = {"error": {"message": exc.message, "type": exc.error_code.lower(), "code": exc.error_code}}
    else:
        body = exc.to_dict()
    return JSONResponse(body, status_code=exc.http_status, headers=retry_headers(exc))


class Guard:
    """The ASGI middleware described above; ``authenticate`` maps an Authorization header to a principal."""

    def __init__(self, app: Any, authenticate: Callable[[str | None], Principal]):
        self.app, self.authenticate = app, authenticate

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            limit = max_body_bytes()
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise RequestTooLarge(f"the request body has {declared} bytes; this server accepts at most {limit} "
                                      f"(SQLINFER_MAX_BODY_BYTES); send fewer rows per request")
            if path not in public_paths() and not path.startswith(PUBLIC_PREFIXES):
                scope.setdefault("state", {})["principal"] = await self._principal(headers.get("authorization"))
            await self.app(scope, _limited(receive, limit), tracking_send)
        except Exception as exc:  # noqa: BLE001  (every failure must end as one response, not a dropped connection)
            if started:  # the response is under way (a stream): nothing more can be said in HTTP
                log.error("error after the response started on %s %s: %s", scope.get("method"), path, type(exc).__name__)
                return
            if not isinstance(exc, SqlinferError):
                log.error("internal error on %s %s: %s", scope.get("method"), path, type(exc).__name__,
                          exc_info=os.environ.get("SQLINFER_DEBUG_TRACEBACKS") == "1")
                exc = SqlinferError("internal error in sqlinfer; the server log has the details")
            await error_response(exc, path)(scope, receive, send)


    async def _principal(self, authorization: str | None) -> Principal:
        """From memory when the token is cached (the hot path); a miss reads SQLite on a thread."""
        try:
            with memory_only():
                return self.authenticate(authorization)
        except NotCached:
            return await run_in_threadpool(self.authenticate, authorization)


def _limited(receive: Callable, limit: int) -> Callable:
    """``receive`` that refuses a (chunked) body once it passes ``limit`` bytes."""
    seen = 0

    async def limited():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise RequestTooLarge(f"the request body passed {limit} bytes, the most this server accepts "
                                      f"(SQLINFER_MAX_BODY_BYTES); send fewer rows per request")
        return message
    return limited


# -- dependencies ------------------------------------------------------------------------------


async def principal(request: Request) -> Principal:
    """Who is calling, as the guard authenticated them; a route reached without it is refused.
    (``async``: FastAPI runs a plain ``def`` dependency on a worker thread, a hop per request.)"""
    return _authenticated(request)


def _authenticated(request: Request) -> Principal:
    who = getattr(request.state, "principal", None)
    if who is None:
        raise Unauthenticated("missing Authorization header; send 'Authorization: Bearer <token>'")
    return who


async def admin(request: Request) -> Principal:
    who = _authenticated(request)
    if not who.is_admin:
        raise PermissionDenied(f"user {who.user_name!r} is not an admin; this needs an admin token "
                               f"(`sqlinfer tokens create --user NAME --admin`)")
    return who


# -- JSON bodies with bounded nesting ----------------------------------------------------------


def parse_json(raw: bytes) -> Any:
    """A request body as JSON, refusing what is not JSON and what nests deeper than MAX_JSON_DEPTH."""
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except RecursionError:
        raise MalformedRequest(f"the request body nests deeper than {MAX_JSON_DEPTH} levels, the most this server "
                               f"accepts") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MalformedRequest(f"the request body is not valid JSON: {exc}") from None
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise MalformedRequest(f"the request body nests deeper than {MAX_JSON_DEPTH} levels, the most this server "
                                   f"accepts")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, (dict, list)))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item if isinstance(v, (dict, list)))
    return value


class _BoundedJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class JsonRoute(APIRoute):
    """Routes whose typed bodies are decoded with :func:`parse_json` (bounded depth, our errors)."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            # Databricks' REST API takes JSON whatever Content-Type says (curl -d sends a form type).
            headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
            scope = dict(request.scope, headers=headers + [(b"content-type", b"application/json")])
            return await handler(_BoundedJsonRequest(scope, request.receive))
        return route
