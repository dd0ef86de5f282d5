"""One event loop per process for callers that are not async (SQL jobs, the CLI, threads).

The provider calls are written once, as coroutines on a pooled async HTTP client
(:mod:`serving.data.upstream`). The REST server awaits them on its own loop; everything else (an
``ai_query`` batch on a DuckDB thread, a Spark batch on a server thread) hands them to this
loop, a daemon thread started on first use, and waits. A batch's answers come back to the
calling thread one by one as they finish (:func:`run_batch`), so ``on_result`` (which commits to
the result store, a SQLite write) runs there and never blocks the loop.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from typing import Any, Awaitable, Callable, Coroutine, Sequence

_LOCK = threading.Lock()
_LOOP: list[Any] = [None, None]  # (loop, pid): a forked child starts its own


def background_loop() -> asyncio.AbstractEventLoop:
    """This process's background loop, started on first use."""
    with _LOCK:
        loop, pid = _LOOP
        if loop is not None and pid == os.getpid() and loop.is_running():
            return loop
        loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(started.set)
            loop.run_forever()

        threading.Thread(target=run, name="sqlinfer-async-io", daemon=True).start()
        started.wait()
        _LOOP[:] = [loop, os.getpid()]
        return loop


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coroutine`` on the background loop and wait for its value (or exception)."""
    return asyncio.run_coroutine_threadsafe(coroutine, background_loop()).result()


def run_batch(items: Sequence[Any], one: Callable[[int, Any], Awaitable[Any]],
              on_result: Callable[[int, Any], None] | None) -> list[Any]:
    """``one(index, item)`` for every item, concurrently on the background loop; results in input
    order. ``on_result`` is called on *this* thread as each answer arrives."""
    if not items:
        return []
    if on_result is None:  # nothing to hand over one by one: wait for them all
        async def gathered() -> list[Any]:
            return list(await asyncio.gather(*(one(i, item) for i, item in enumerate(items))))
        return run(gathered())
    arrived: queue.SimpleQueue = queue.SimpleQueue()

    async def all_of() -> None:
        async def each(index: int, item: Any) -> None:
            try:
                arrived.put((index, await one(index, item), None))
            except BaseException as exc:  # noqa: BLE001  (handed to the waiting thread, which raises it)
                arrived.put((index, None, exc))

        await asyncio.gather(*(each(i, item) for i, item in enumerate(items)))

    future = asyncio.run_coroutine_threadsafe(all_of(), background_loop())
    results: list[Any] = [None] * len(items)
    failure: BaseException | None = None
    for _ in items:
        index, result, exc = arrived.get()
        if exc is not None:
            failure = failure or exc
            continue
        results[index] = result
        if on_result is not None and failure is None:
            on_result(index, result)
    future.result()
    if failure is not None:
        raise failure
    return results
