"""``/api/2.0/sqlinfer/serving-endpoints/{name}/...``: what an endpoint did, read-only, a sqlinfer extension.

Why this module exists: the Serving UI draws its endpoint pages (usage charts, config history,
recent requests) from these routes, and they are public API for any client too, with the same
tokens and permissions as the rest of the REST edge; nothing here is UI-only.

* ``GET .../usage``: requests, errors, tokens, latency percentiles and cost over time (CAN_VIEW,
  as ``GET /serving-endpoints/{name}/metrics``, which holds the same counts as Prometheus text);
* ``GET .../config-history``: every config version and how its deployment ended (CAN_VIEW, as the
  endpoint's own view shows its config), through :func:`~serving.control.views.public`, so no
  sealed secret and no internal ``_`` key ever leaves the server;
* ``GET .../inference-rows``: the latest request and response payloads (CAN_MANAGE: they hold
  other users' prompts). Payloads are kept only while ``ai_gateway.inference_table_config`` is
  enabled.

Usage and payload rows are matched by endpoint id as well as name, so an endpoint re-created under
a deleted one's name shows none of its predecessor's rows. Costs use ``SQLINFER_PRICES`` (dollars
per million input/output tokens, ``ai_functions.stats.prices_from_env``); this module sits at the
REST edge, as ``serving.api.ai_functions`` does, and tests/test_layers.py lists it.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from fastapi import APIRouter, Depends, Query, Request

from ai_functions.stats import prices_from_env
from serving.api.guard import JsonRoute, principal
from serving.api.queries import may_view
from serving.control.auth import Principal
from serving.control.store import SYSTEM_PREFIX
from serving.control.views import public
from serving.errors import PermissionDenied

log = logging.getLogger("sqlinfer.rest")

PREFIX = "/api/2.0/sqlinfer/serving-endpoints"
PERCENTILES = (50, 90, 99)
COUNTED = ("requests", "errors", "input_tokens", "output_tokens")
MAX_WINDOW_MINUTES = 30 * 24 * 60


def router() -> APIRouter:
    api = APIRouter(prefix=PREFIX, tags=["endpoint insights"], dependencies=[Depends(principal)], route_class=JsonRoute)

    @api.get("/{name}/usage", summary="Requests, errors, tokens, latency and cost over time (CAN_VIEW)")
    def usage(name: str, request: Request, who: Principal = Depends(principal),
              window_minutes: int = Query(60, ge=1, le=MAX_WINDOW_MINUTES, description="how far back, in minutes: 1 to 43200 (30 days)"),
              buckets: int = Query(30, ge=1, le=200, description="how many equal time buckets: 1 to 200")) -> dict[str, Any]:
        """Needs CAN_VIEW, as the endpoint's Prometheus metrics: counts and timings, no payloads.

        The window ends now and is cut into ``buckets`` buckets of ``bucket_ms`` each (the window
        rounded up to whole milliseconds per bucket, so ``start_time_ms = end_time_ms - buckets *
        bucket_ms``); every bucket is listed, empty ones with zeros. Errors are rows with a status
        of 400 or more; latency percentiles are nearest-rank (null without rows); ``cost`` is in the
        currency of ``SQLINFER_PRICES`` and null when the endpoint has no price there.
        """
        endpoint_id = may_view(request, who, name)
        end = int(time.time() * 1000)
        width = -(-window_minutes * 60_000 // buckets)
        start = end - width * buckets
        request.app.state.usage.flush()  # rows this process recorded are written before they are read
        db = request.app.state.service.db
        counts, percentiles = _usage_rows(db.read(), name, endpoint_id, start, end, width, buckets)
        price = _price(name)
        return {
            "endpoint": name, "start_time_ms": start, "end_time_ms": end, "bucket_ms": width,
            "price": {"input_per_million": price[0], "output_per_million": price[1]} if price else None,
            "buckets": [{"start_time_ms": start + index * width} | _summary(counts.get(index), percentiles.get(index), price)
                        for index in range(buckets)],
            "totals": _summary(_total(counts.values()), percentiles.get("total"), price),
        }

    @api.get("/{name}/config-history", summary="Every config version of the endpoint, newest first (CAN_VIEW)")
    def config_history(name: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        """Needs CAN_VIEW, as the endpoint's current config does. Each version's config is shown as
        the endpoint view shows configs: no sealed secret, no internal ``_`` key. System endpoints
        have one fixed config and no history (``versions`` is empty)."""
        endpoint_id = may_view(request, who, name)
        if name.startswith(SYSTEM_PREFIX):
            return {"versions": []}
        rows = request.app.state.service.db.read().execute(
            "SELECT config_version, outcome, created_timestamp, config_json FROM endpoint_config_history "
            "WHERE endpoint_id = ? ORDER BY config_version DESC", (endpoint_id,)).fetchall()
        return {"versions": [{"config_version": row["config_version"], "outcome": row["outcome"],
                              "created_timestamp": row["created_timestamp"],
                              "config": public(json.loads(row["config_json"]))} for row in rows]}

    @api.get("/{name}/inference-rows", summary="The latest request and response payloads, newest first (CAN_MANAGE)")
    def inference_rows(name: str, request: Request, who: Principal = Depends(principal),
                       limit: int = Query(20, ge=1, le=100, description="how many rows: 1 to 100")) -> dict[str, Any]:
        """Needs CAN_MANAGE: payloads hold other users' prompts and answers (with PII masked where the
        endpoint's input guardrails look for it). Rows exist only for requests made while the
        endpoint's ``ai_gateway.inference_table_config.enabled`` was true; ``requester`` and
        ``status_code`` are null if a payload's usage row is missing."""
        endpoint_id = _may_manage(request, who, name)
        request.app.state.usage.flush()
        rows = request.app.state.service.db.read().execute(
            "SELECT p.request_id, p.timestamp_ms, u.requester, u.status_code, p.request_json, p.response_json "
            "FROM inference_payloads p LEFT JOIN usage u ON u.request_id = p.request_id "
            "WHERE p.endpoint_name = ? AND (u.endpoint_id = ? OR u.request_id IS NULL) "
            "ORDER BY p.timestamp_ms DESC, p.rowid DESC LIMIT ?", (name, endpoint_id, limit)).fetchall()
        return {"rows": [{"request_id": row["request_id"], "timestamp_ms": row["timestamp_ms"],
                          "requester": row["requester"], "status_code": row["status_code"],
                          "request": json.loads(row["request_json"]), "response": json.loads(row["response_json"])}
                         for row in rows]}

    return api


def _may_manage(request: Request, who: Principal, name: str) -> str:
    """CAN_MANAGE on ``name``, and its endpoint id: 404 if unknown, 403 without it. The system
    endpoints are managed by sqlinfer: only admins hold CAN_MANAGE on them."""
    if name.startswith(SYSTEM_PREFIX):
        may_view(request, who, name)  # an unknown system name is a 404
        if not who.is_admin:
            raise PermissionDenied(f"user {who.user_name!r} needs CAN_MANAGE on endpoint {name!r} (has CAN_QUERY); "
                                   f"only admins manage system endpoints")
        return name
    service = request.app.state.service
    endpoint_id = service.endpoint_id(name)
    service.auth.require(who, endpoint_id, name, "CAN_MANAGE")
    return endpoint_id


def _usage_rows(con, name: str, endpoint_id: str, start: int, end: int, width: int, buckets: int):
    """Per-bucket sums, and the latencies at the nearest ranks of PERCENTILES per bucket and for
    the whole window (``"total"``), computed in SQLite so that a 30-day window reads no row list."""
    rows = ("SELECT min(:last, (timestamp_ms - :start) / :width) AS bucket, status_code, input_tokens, output_tokens, "
            "latency_ms FROM usage WHERE endpoint_name = :name AND endpoint_id = :id AND timestamp_ms BETWEEN :start AND :end")
    args = {"last": buckets - 1, "start": start, "end": end, "width": width, "name": name, "id": endpoint_id}
    counts = {row["bucket"]: dict(row) for row in con.execute(
        f"SELECT bucket, count(*) AS requests, sum(status_code >= 400) AS errors, sum(input_tokens) AS input_tokens, "
        f"sum(output_tokens) AS output_tokens FROM ({rows}) GROUP BY bucket", args)}
    at_ranks = " OR ".join(f"{pos} = ({p} * {n} + 99) / 100" for p in PERCENTILES  # pos = ceil(p/100 * n)
                           for pos, n in (("pos", "n"), ("total_pos", "total_n")))
    ranked = con.execute(
        f"SELECT * FROM (SELECT bucket, latency_ms, "
        f"row_number() OVER (PARTITION BY bucket ORDER BY latency_ms) AS pos, count(*) OVER (PARTITION BY bucket) AS n, "
        f"row_number() OVER (ORDER BY latency_ms) AS total_pos, count(*) OVER () AS total_n FROM ({rows})) "
        f"WHERE {at_ranks}", args)
    percentiles: dict[Any, dict[int, float]] = {}
    for row in ranked:
        for p in PERCENTILES:
            if row["pos"] == (p * row["n"] + 99) // 100:
                percentiles.setdefault(row["bucket"], {})[p] = row["latency_ms"]
            if row["total_pos"] == (p * row["total_n"] + 99) // 100:
                percentiles.setdefault("total", {})[p] = row["latency_ms"]
    return counts, percentiles


def _total(counts) -> dict[str, int]:
    return {field: sum(row[field] for row in counts) for field in COUNTED}


def _summary(counts: dict[str, Any] | None, latencies: dict[int, float] | None,
             price: tuple[float, float] | None) -> dict[str, Any]:
    counts = counts or {}
    summary = {field: int(counts.get(field) or 0) for field in COUNTED}
    for p in PERCENTILES:
        summary[f"latency_ms_p{p}"] = (latencies or {}).get(p)
    summary["cost"] = (summary["input_tokens"] * price[0] + summary["output_tokens"] * price[1]) / 1e6 if price else None
    return summary


def _price(name: str) -> tuple[float, float] | None:
    """The endpoint's price per million input and output tokens in ``SQLINFER_PRICES``, if any. A
    malformed variable is the server's misconfiguration: logged, and answered as no price."""
    try:
        return prices_from_env().get(name)
    except ValueError as exc:
        log.warning("ignoring SQLINFER_PRICES: %s", exc)
        return None
