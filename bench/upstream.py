"""A minimal, fast OpenAI-compatible upstream for benchmarks (raw ASGI under uvicorn).

``python bench/upstream.py PORT LATENCY_MS`` answers every POST with a canned chat completion
after LATENCY_MS, and ``GET /stats`` with how many requests arrived in each wall-clock second
(so a benchmark can check a rate limit was never exceeded).
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import time

ANSWER = json.dumps({
    "id": "x", "object": "chat.completion", "created": 0, "model": "bench",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}).encode()
ARRIVALS: collections.Counter = collections.Counter()


def make_app(latency: float):
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        while True:  # drain the body
            message = await receive()
            if not message.get("more_body"):
                break
        if scope["method"] == "GET" and scope["path"] == "/stats":
            body = json.dumps({str(k): v for k, v in ARRIVALS.items()}).encode()
        else:
            ARRIVALS[int(time.time())] += 1
            if latency:
                await asyncio.sleep(latency)
            body = ANSWER
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
    return app


if __name__ == "__main__":
    import uvicorn

    port, latency_ms = int(sys.argv[1]), float(sys.argv[2])
    uvicorn.run(make_app(latency_ms / 1000), host="127.0.0.1", port=port, log_level="warning", access_log=False)
