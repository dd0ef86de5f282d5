"""The pooled async HTTP client that carries provider calls: one session per upstream per loop.

Why aiohttp and not the OpenAI SDK's (httpx) clients: against the loopback upstream of
``bench/upstream.py`` on a 2-core AMD EPYC, one request at a time took 743 us with an aiohttp
session and 1,651 us with ``httpx.AsyncClient``; 16 at a time reached 3,794 req/s with aiohttp and
347 with httpx's async pool (a one-off measurement, in the README's gateway section; the SDK's
sync client per thread, the path this replaces, reached 164 req/s behind the server). A provider call is a JSON
POST with a bearer key: the SDK adds nothing there we would have to rewrite, so the providers post
it here (``serving.data.providers``). The SDK stays where it does add protocol value: Azure
OpenAI's URL and key scheme, Anthropic's Messages client, and parsing streamed server-sent events.

A session (and so its connection pool) belongs to one event loop: the REST server's loop has
its own, and the background loop of :mod:`serving.data.aio` (SQL jobs) another. Each is keyed by
upstream origin, so every endpoint on one provider shares its connections.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import os
import threading
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlsplit

USER_AGENT = "sqlinfer-gateway/1 (aiohttp)"
_SESSIONS: dict[tuple[int, str], tuple[Any, Any]] = {}  # (loop id, origin) -> (loop, session)
_LOCK = threading.Lock()


@dataclass(frozen=True)
class UpstreamAnswer:
    """An upstream's HTTP answer: status, the headers that matter to retries, and the raw body."""

    status: int
    retry_after: str | None
    body: bytes


class UpstreamUnreachable(Exception):
    """The request never got an HTTP answer: refused, dropped, or timed out (worth a retry)."""


def connections_per_upstream() -> int:
    """``SQLINFER_UPSTREAM_CONNECTIONS`` (default 256): open connections one upstream may hold."""
    return int(os.environ.get("SQLINFER_UPSTREAM_CONNECTIONS", "256"))


def _session(origin: str) -> Any:
    import aiohttp

    loop = asyncio.get_running_loop()
    key = (id(loop), origin)
    entry = _SESSIONS.get(key)
    session = entry[1] if entry is not None and entry[0] is loop else None  # an id may be reused by a later loop
    if session is None or session.closed:
        connector = aiohttp.TCPConnector(limit=connections_per_upstream(), ttl_dns_cache=300)
        # No cookie jar: one session carries several endpoints' keys to an origin, and a cookie set
        # for one must never ride along with another's requests.
        session = aiohttp.ClientSession(connector=connector, headers={"User-Agent": USER_AGENT},
                                        cookie_jar=aiohttp.DummyCookieJar())
        session.sqlinfer_proxy = _proxy_for(origin)
        with _LOCK:
            _SESSIONS[key] = (loop, session)
    return session


def _proxy_for(origin: str) -> str | None:
    """HTTPS_PROXY / HTTP_PROXY / NO_PROXY for one upstream, read once when its session opens
    (aiohttp's ``trust_env`` reads them and ~/.netrc again on every request: a measurable cost)."""
    from urllib.request import getproxies, proxy_bypass

    parts = urlsplit(origin)
    proxy = getproxies().get(parts.scheme)
    if proxy is None or proxy_bypass(parts.hostname or ""):
        return None
    return proxy


def _dumps(value: Any) -> bytes:
    import json

    return json.dumps(value, separators=(",", ":")).encode()


@functools.lru_cache(maxsize=1024)
def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@functools.lru_cache(maxsize=64)
def _timeout(seconds: float) -> Any:
    import aiohttp

    return aiohttp.ClientTimeout(total=seconds)


async def post_json(url: str, body: Any, headers: Mapping[str, str], timeout: float) -> UpstreamAnswer:
    """POST ``body`` as JSON; the whole answer read, or :class:`UpstreamUnreachable`."""
    import aiohttp

    origin = _origin(url)
    session = _session(origin)
    try:
        async with session.post(url, data=_dumps(body), headers={**headers, "Content-Type": "application/json"},
                                timeout=_timeout(timeout), proxy=session.sqlinfer_proxy,
                                allow_redirects=False) as response:  # a redirect must not leave the egress allow-list
            return UpstreamAnswer(response.status, response.headers.get("retry-after"), await response.read())
    except asyncio.TimeoutError:
        raise UpstreamUnreachable(f"APITimeoutError: no answer from {urlsplit(origin).netloc} within {timeout:g} s") from None
    except aiohttp.ClientError as exc:
        raise UpstreamUnreachable(f"APIConnectionError: {type(exc).__name__}: {exc}") from None


def _at_exit() -> None:
    """Sessions still open as the process ends: closed on their loop if it still runs (the
    background loop), else let go (their loop is gone; the OS closes the sockets)."""
    with _LOCK:
        entries = list(_SESSIONS.values())
        _SESSIONS.clear()
    for loop, session in entries:
        if loop.is_running() and not loop.is_closed():
            try:
                asyncio.run_coroutine_threadsafe(session.close(), loop).result(timeout=2)
                continue
            except Exception:  # noqa: BLE001  (exiting: nothing left to report to)
                pass
        session.detach()


atexit.register(_at_exit)


async def close_sessions() -> None:
    """Close the sessions of the running loop (the server calls it as it shuts down)."""
    loop_id = id(asyncio.get_running_loop())
    with _LOCK:
        mine = [key for key in _SESSIONS if key[0] == loop_id]
        sessions = [_SESSIONS.pop(key)[1] for key in mine]
    for session in sessions:
        await session.close()
