"""A small, fast HTTP/1.1 load generator: raw asyncio sockets, keep-alive, one request in flight
per connection.

httpx spends ~2 ms of CPU per request, so on two cores it saturates at ~400 requests/s: below
the server it is meant to measure. This client parses only the status line and Content-Length
(~0.1 ms per request), so the server, not the client, is what a throughput figure measures.

``python bench/loadgen.py URL TOTAL CONCURRENCY [TOKEN]`` prints ``{"rps": ..., "errors": ...}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from urllib.parse import urlsplit

BODY = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()


async def run(url: str, total: int, concurrency: int, token: str | None) -> dict:
    parts = urlsplit(url)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    request = (f"POST {parts.path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n{auth}"
               f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n").encode() + BODY
    remaining = total
    errors = 0

    async def connection() -> None:
        nonlocal remaining, errors
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        while remaining > 0:
            remaining -= 1
            writer.write(request)
            status_line = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if not status_line.startswith(b"HTTP/1.1 200"):
                errors += 1
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return {"rps": total / (time.perf_counter() - started), "errors": errors}


if __name__ == "__main__":
    url, total, concurrency = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    print(json.dumps(asyncio.run(run(url, total, concurrency, sys.argv[4] if len(sys.argv) > 4 else None))))
