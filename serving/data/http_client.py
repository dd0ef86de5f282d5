"""A :class:`~serving.data.client.ServingClient` that talks to ``sqlinfer serve`` over HTTP.

Spark executors use it: each task sends its whole batch in one ``POST /api/2.0/sqlinfer/batch``
(see :mod:`serving.data.batch_wire`), so every executor shares the server's engine, rate limits and
usage log, and nothing heavy (an engine, an SDK client) is ever pickled — an executor builds
this client from a URL and a token. The token must have CAN_QUERY on the endpoints used.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Sequence

from serving.data.usage import ai_function
from engine.prefix_reuse import PrefixReuse
from engine.types import SamplingOptions, Task
from serving.data.backends import ResultCallback
from serving.data.batch_wire import decode_result
from engine.errors import TemporarilyUnavailable
from serving.errors import SqlinferError, row_error


class HttpServingClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 900.0):
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self._info: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    # -- metadata ----------------------------------------------------------------------------

    def _endpoint(self, endpoint: str) -> dict[str, Any]:
        """An endpoint's task, dimension and config version, asked again after 30 s (a config
        update must reach long-running executors)."""
        with self._lock:
            known = self._info.get(endpoint)
        if known is None or time.monotonic() - known["_fetched"] > 30:
            known = self._get(f"/api/2.0/sqlinfer/endpoints/{endpoint}") | {"_fetched": time.monotonic()}
            with self._lock:
                self._info[endpoint] = known
        return known

    def endpoints(self) -> list[tuple[str, Task]]:
        listed = self._get("/api/2.0/sqlinfer/endpoints")["endpoints"]
        return [(e["name"], e["task"]) for e in listed]

    def task(self, endpoint: str) -> Task:
        return self._endpoint(endpoint)["task"]

    def embedding_dimension(self, endpoint: str) -> int | None:
        return self._endpoint(endpoint).get("embedding_dimension")

    def warm_up(self, endpoint: str) -> None:
        self._endpoint(endpoint)

    def config_version(self, endpoint: str) -> str | None:
        return self._endpoint(endpoint).get("cache_version")

    def count_tokens(self, endpoint: str, requests: Sequence[Any], kind: str) -> list[int] | None:
        return None  # the tokenizer is on the server; explain estimates from text length instead

    def prefix_reuse(self, endpoint: str, requests: Sequence[Any], kind: str) -> PrefixReuse:
        return PrefixReuse(unknown_because="the engine and its tokenizer are on the server")

    def throughput(self, endpoint: str) -> float | None:
        return None

    def rate_limits(self, endpoint: str) -> list[dict[str, Any]]:
        return []

    # -- batches -----------------------------------------------------------------------------

    def chat(self, endpoint, conversations, options, on_result=None):
        return self._batch(endpoint, "chat", [list(c) for c in conversations], options, on_result)

    def complete(self, endpoint, prompts, options, on_result=None):
        return self._batch(endpoint, "complete", list(prompts), options, on_result)

    def embed(self, endpoint, texts, on_result=None):
        return self._batch(endpoint, "embed", list(texts), None, on_result)

    def predict(self, endpoint, rows, params=None, on_result=None):
        return self._batch(endpoint, "predict", list(rows), None, on_result, params)

    def stream(self, endpoint, request, options, chat):
        raise SqlinferError("streaming goes through the OpenAI-compatible routes, not the batch client")

    def _batch(self, endpoint: str, kind: str, requests: Sequence[Any], options: SamplingOptions | None,
               on_result: ResultCallback | None, params: dict[str, Any] | None = None) -> list[Any]:
        """One whole batch, streamed back: each answer is handed to ``on_result`` (which commits it
        to the result store) the moment its line arrives, not when the whole batch is done."""
        import httpx

        body: dict[str, Any] = {"endpoint": endpoint, "kind": kind, "requests": requests, "stream": True}
        if options is not None:
            body["options"] = options.model_dump(exclude_none=True, mode="json")
        if params:
            body["params"] = params
        if ai_function.get():
            body["function"] = ai_function.get()  # the server's usage rows name the SQL function
        results: list[Any] = [None] * len(requests)
        try:
            with self._http.stream("POST", "/api/2.0/sqlinfer/batch", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    self._answer(response)
                for line in response.iter_lines():
                    if not line:
                        continue
                    message = json.loads(line)
                    if "index" in message:
                        index, result = message["index"], decode_result(kind, message["result"])
                        results[index] = result
                        if on_result is not None:
                            on_result(index, result)
                    elif "error" in message:
                        error = message["error"]
                        raise row_error(f"sqlinfer serve at {self.url} failed the batch: {error.get('error_code')}: "
                                        f"{error.get('message')}", error.get("http_status"))
                    elif message.get("done"):
                        break
        except httpx.TransportError as exc:
            raise TemporarilyUnavailable(
                f"lost sqlinfer serve at {self.url} during a batch ({type(exc).__name__}: {exc or 'no answer'}); "
                f"the answers that arrived are kept, run the query again for the rest") from None
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            raise TemporarilyUnavailable(f"sqlinfer serve at {self.url} ended the batch without {len(missing)} "
                                         f"answer(s); run the query again for the rest")
        return results

    # -- HTTP ----------------------------------------------------------------------------------

    def _get(self, path: str) -> dict[str, Any]:
        return self._answer(self._send("GET", path))

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._answer(self._send("POST", path, body))

    def _send(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        import httpx

        try:
            return self._http.request(method, path, json=body)
        except httpx.TransportError as exc:
            raise TemporarilyUnavailable(
                f"cannot reach sqlinfer serve at {self.url} ({type(exc).__name__}: {exc or 'no answer'}); start it "
                f"with `sqlinfer serve` or check the --server / SQLINFER_SERVER URL") from None

    def _answer(self, response: Any) -> dict[str, Any]:
        if response.status_code == 200:
            return response.json()
        try:
            error = response.json()
            message = f"{error.get('error_code')}: {error.get('message')}"
        except ValueError:
            message = response.text[:500]
        raise row_error(f"sqlinfer serve at {self.url} answered HTTP {response.status_code}: {message}", response.status_code)

    def close(self) -> None:
        self._http.close()
