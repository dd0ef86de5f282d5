"""Answering one batch from a remote SQL engine, so that nothing is paid twice.

Why on the server: an executor stores each answer the moment it reaches it, but when a Spark
driver or worker is killed, the requests the server was still answering are paid for and lost.
So the server keeps its own result store (``$SQLINFER_HOME/results.db`` of the server, keyed
exactly as the SQL functions key theirs): deterministic answers are committed here as they
arrive, whether or not the client is still listening, and a re-run is answered from it. A client
that goes away sets ``cancel``: nothing new is started (``engine.cancellation``).

:func:`run_batch` reports each answer through ``emit(index, result)`` in completion order; the
REST edge streams them to the client (``serving.data.batch_wire``).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable

from engine import cancellation
from engine.types import SamplingOptions
from serving.data.batch_wire import decode_result, encode_result
from serving.data.client import InProcessClient
from serving.data.result_store import ResultStore, answer_keys, is_deterministic

Emit = Callable[[int, Any], None]


def run_batch(client: InProcessClient, store: ResultStore | None, endpoint: str, kind: str, requests: list[Any],
              options: SamplingOptions | None, params: dict[str, Any] | None, emit: Emit,
              cancel: threading.Event | None = None) -> None:
    """Answer ``requests``: stored answers at once (``from_store``), the rest in one backend call."""
    version = client.config_version(endpoint)
    keyed = store is not None and version is not None and is_deterministic(kind, options or SamplingOptions())
    keys = answer_keys(endpoint, version, kind, options, requests, params) if keyed else []
    pending = list(range(len(requests)))
    if keyed:
        stored = store.get_many(keys)
        for index, key in enumerate(keys):
            if key in stored:
                emit(index, dataclasses.replace(decode_result(*stored[key]), from_store=True))
        pending = [i for i, key in enumerate(keys) if key not in stored]
    if not pending:
        return

    def arrived(position: int, result: Any) -> None:
        index = pending[position]
        if keyed and not result.error:
            store.put(keys[index], endpoint, kind, encode_result(result))  # committed before the client hears of it
        emit(index, result)

    batch = [requests[i] for i in pending]
    token = cancellation.CANCEL.set(cancel)
    try:
        reported = _call(client, endpoint, kind, batch, options, params, arrived)
    finally:
        cancellation.CANCEL.reset(token)
    for position, result in reported:  # backends that answered without reporting each result
        arrived(position, result)


def _call(client: InProcessClient, endpoint: str, kind: str, batch: list[Any], options: SamplingOptions | None,
          params: dict[str, Any] | None, arrived: Emit) -> list[tuple[int, Any]]:
    seen: set[int] = set()

    def on_result(position: int, result: Any) -> None:
        seen.add(position)
        arrived(position, result)

    if kind == "embed":
        results = client.embed(endpoint, batch, on_result)
    elif kind == "predict":
        results = client.predict(endpoint, batch, params, on_result)
    elif kind == "chat":
        results = client.chat(endpoint, batch, options or SamplingOptions(), on_result)
    else:
        results = client.complete(endpoint, batch, options or SamplingOptions(), on_result)
    return [(position, result) for position, result in enumerate(results) if position not in seen]
