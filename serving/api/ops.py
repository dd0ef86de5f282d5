"""Operations routes: ``/health``, ``/metrics`` and the Databricks SDK's config probe.

These are the public routes (see ``serving.api.guard.PUBLIC_PATHS``): they reveal no names, no
payloads and no secrets. ``/metrics`` needs a token when ``SQLINFER_METRICS_AUTH=token``.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse


def router(started: float) -> APIRouter:
    api = APIRouter(tags=["operations"])

    @api.get("/health", summary="Liveness and the store's schema version")
    def health(request: Request) -> dict[str, Any]:
        return {"status": "ok", "schema_version": request.app.state.service.db.schema_version}

    @api.get("/metrics", summary="Server counters as Prometheus text", response_class=PlainTextResponse)
    def metrics(request: Request) -> PlainTextResponse:
        counters = request.app.state.request_counts
        lines = ["# HELP sqlinfer_http_requests_total HTTP requests answered, by method and status.",
                 "# TYPE sqlinfer_http_requests_total counter"]
        for (method, status), count in sorted(counters.items()):
            lines.append(f'sqlinfer_http_requests_total{{method="{method}",status="{status}"}} {count}')
        lines += ["# HELP sqlinfer_endpoints Endpoints in the registry (system endpoints excluded).",
                  "# TYPE sqlinfer_endpoints gauge", f"sqlinfer_endpoints {request.app.state.service.store.count()}",
                  "# HELP sqlinfer_uptime_seconds Seconds since the server started.",
                  "# TYPE sqlinfer_uptime_seconds gauge", f"sqlinfer_uptime_seconds {time.time() - started:.0f}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @api.get("/.well-known/databricks-config", include_in_schema=False)
    def databricks_config() -> JSONResponse:
        """The host metadata databricks-sdk (0.99+) probes before sending a token: nothing to add
        (no workspace id, no OIDC endpoint), so it goes on with the personal access token."""
        return JSONResponse({})

    return api
