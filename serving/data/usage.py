"""Usage tracking: one row per request, REST or SQL, in the registry's database.

Each request records its id, endpoint, served entity, requester, source (``rest`` or ``sql``),
input and output tokens, status code (200, or the failure's), latency, and the caller's
``client_request_id`` and ``usage_context``, and what an AI Gateway guardrail did to it
(``guardrail``, e.g. ``input.pii MASK (email)``; ``serving.data.guardrails``). Rows of one SQL
batch are written in one transaction and share the batch's latency (a batch is answered as a
whole). With the endpoint's
``ai_gateway.inference_table_config.enabled``, request and response payloads are kept too, in
``inference_payloads`` (with PII masked where the endpoint's input guardrails look for it: what was
sent and answered, never what a guardrail found).

Read it from SQL as ``sqlinfer_usage`` (``sqlinfer sql "SELECT ... FROM sqlinfer_usage"``), or
as Prometheus text at ``GET /serving-endpoints/{name}/metrics``.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from engine.types import Choice, GenerationResult
from serving.data.backends import Backend, DelegatingBackend, async_like_inner
from serving.control.db import Database
from serving.errors import SqlinferError
from serving.data.limits import current_user

log = logging.getLogger("sqlinfer.usage")

# What the caller said about a request (REST bodies); SQL batches leave them unset.
request_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("sqlinfer_request_context", default={})
# The SQL function whose rows these are (set by ai_functions, or from a SQL batch's "function").
ai_function: contextvars.ContextVar[str | None] = contextvars.ContextVar("sqlinfer_ai_function", default=None)

COLUMNS = ("request_id", "timestamp_ms", "endpoint_name", "endpoint_id", "served_entity", "requester", "source",
           "input_tokens", "output_tokens", "status_code", "latency_ms", "client_request_id", "usage_context", "error", "guardrail",
           "ai_function")


@dataclass(frozen=True)
class _Refused:
    """The usage record of a request refused before any model saw it."""

    error: str
    status: int
    served_entity: None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    guardrail: str | None = None


class _PendingRows:
    """Usage rows waiting to be written, per database file, flushed by one background thread.

    A request does not wait for its usage row: rows are written together every
    ``SQLINFER_USAGE_FLUSH_SECONDS`` (default 0.05 s), at exit, and before this process reads the
    table. One transaction per flush instead of one per request is what lets the gateway serve
    hundreds of requests per second without queueing on SQLite's write lock. A process killed
    with SIGKILL loses at most the last interval's rows (never the answers themselves).
    """

    def __init__(self, db: Database):
        self.db = db
        self.lock = threading.Lock()  # guards the lists only
        self.writing = threading.Lock()  # one flush at a time
        self.rows: list[tuple[Any, ...]] = []
        self.payloads: list[tuple[Any, ...]] = []
        self.interval = float(os.environ.get("SQLINFER_USAGE_FLUSH_SECONDS", "0.05"))
        self.wake = threading.Event()
        threading.Thread(target=self._run, name="sqlinfer-usage-writer", daemon=True).start()
        atexit.register(self.flush)

    def add(self, rows: Sequence[tuple[Any, ...]], payloads: Sequence[tuple[Any, ...]]) -> None:
        with self.lock:
            self.rows.extend(rows)
            self.payloads.extend(payloads)

    def flush(self) -> None:
        # Taken in turn: a reader that flushed waits for a flush under way, so it sees every row
        # recorded before; ``add`` (on the server's event loop) never waits for SQLite.
        with self.writing:
            with self.lock:
                rows, payloads, self.rows, self.payloads = self.rows, self.payloads, [], []
            if not rows and not payloads:
                return
            try:
                with self.db.write() as con:
                    con.executemany(f"INSERT INTO usage ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})", rows)
                    if payloads:
                        con.executemany("INSERT INTO inference_payloads VALUES (?, ?, ?, ?, ?)", payloads)
            except Exception:  # kept for the next flush (a locked database): a usage row is never dropped
                with self.lock:
                    self.rows[:0], self.payloads[:0] = rows, payloads
                raise

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            try:
                self.flush()
            except Exception:  # a locked or vanished database must not end the writer
                log.exception("could not write usage rows to %s", self.db.path)


_PENDING: dict[str, _PendingRows] = {}
_PENDING_GUARD = threading.Lock()


def flush_all() -> None:
    """Write every pending usage row of this process (a server calls it as it shuts down)."""
    with _PENDING_GUARD:
        pending = list(_PENDING.values())
    for rows in pending:
        rows.flush()


class UsageRecorder:
    def __init__(self, db: Database):
        self.db = db
        with _PENDING_GUARD:
            key = str(db.path.resolve())
            if key not in _PENDING:
                _PENDING[key] = _PendingRows(db)
            self._pending = _PENDING[key]

    def record(self, rows: Sequence[tuple[Any, ...]], payloads: Sequence[tuple[Any, ...]] = ()) -> None:
        self._pending.add(rows, payloads)

    def flush(self) -> None:
        """Write every row recorded so far (readers in this process call it first)."""
        self._pending.flush()

    def rows(self, endpoint_name: str | None = None) -> list[dict[str, Any]]:
        self.flush()
        query = f"SELECT {', '.join(COLUMNS)} FROM usage"
        args: tuple[Any, ...] = ()
        if endpoint_name is not None:
            query, args = query + " WHERE endpoint_name = ?", (endpoint_name,)
        return [dict(row) for row in self.db.read().execute(query + " ORDER BY timestamp_ms, request_id", args)]

    def prometheus(self, endpoint_name: str) -> str:
        """One endpoint's requests, errors, latency, tokens (from the usage table, every process)
        and requests in flight (this process), as Prometheus text."""
        self.flush()
        con = self.db.read()
        rows = con.execute(
            "SELECT served_entity, source, status_code, count(*) AS n, sum(input_tokens) AS i, sum(output_tokens) AS o, "
            "sum(latency_ms) AS l FROM usage WHERE endpoint_name = ? GROUP BY 1, 2, 3 ORDER BY 1, 2, 3", (endpoint_name,)
        ).fetchall()
        series = {
            "requests_total": ("counter", "Requests answered, by served entity, source and status.", lambda r: r["n"]),
            "errors_total": ("counter", "Requests answered with a status of 400 or more.",
                             lambda r: r["n"] if r["status_code"] >= 400 else 0),
            "input_tokens_total": ("counter", "Prompt tokens of the requests.", lambda r: r["i"] or 0),
            "output_tokens_total": ("counter", "Generated tokens of the requests.", lambda r: r["o"] or 0),
            "latency_ms_sum": ("counter", "Sum of request latencies in milliseconds (a SQL batch's rows share it).",
                               lambda r: round(r["l"] or 0, 1)),
            "latency_ms_count": ("counter", "Requests the latency sum covers.", lambda r: r["n"]),
        }
        lines = []
        for suffix, (kind, text, value) in series.items():
            name = f"sqlinfer_endpoint_{suffix}"
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            for row in rows:
                labels = (f'endpoint="{endpoint_name}",served_entity="{row["served_entity"] or ""}",source="{row["source"]}",'
                          f'status="{row["status_code"]}"')
                lines.append(f"{name}{{{labels}}} {value(row)}")
        with _IN_FLIGHT_LOCK:
            in_flight = _IN_FLIGHT.get(endpoint_name, 0)
        lines += ["# HELP sqlinfer_endpoint_requests_in_flight Requests this server process is answering now.",
                  "# TYPE sqlinfer_endpoint_requests_in_flight gauge",
                  f'sqlinfer_endpoint_requests_in_flight{{endpoint="{endpoint_name}"}} {in_flight}']
        return "\n".join(lines) + "\n"


_IN_FLIGHT: dict[str, int] = {}
_IN_FLIGHT_LOCK = threading.Lock()


def _in_flight(endpoint_name: str, change: int) -> None:
    """Requests of an endpoint being answered by this process right now (the in-flight gauge)."""
    with _IN_FLIGHT_LOCK:
        _IN_FLIGHT[endpoint_name] = _IN_FLIGHT.get(endpoint_name, 0) + change


class UsageRecordingBackend(DelegatingBackend):
    """Records every request answered by ``inner`` (and its payloads when asked)."""

    def __init__(self, inner: Backend, recorder: UsageRecorder, endpoint_id: str, endpoint_name: str,
                 log_payloads: bool = False):
        super().__init__(inner)
        self.recorder, self.endpoint_id, self.endpoint_name = recorder, endpoint_id, endpoint_name
        self.log_payloads = log_payloads

    native_async = property(async_like_inner)

    @contextlib.contextmanager
    def _recording(self, items: Sequence[Any], describe: Callable[[Any], Any]) -> Iterator[list[Any]]:
        """Around one call: its requests counted in flight, and its usage rows queued when it ends
        (the caller appends the results); a refusal as a whole (e.g. 429) is recorded with its status."""
        started = time.perf_counter()
        _in_flight(self.endpoint_name, len(items))
        answered: list[Any] = []
        try:
            yield answered
        except SqlinferError as exc:
            refused = _Refused(error=exc.message, status=exc.http_status, guardrail=getattr(exc, "guardrail", None))
            self._write(items, [refused] * len(items), (time.perf_counter() - started) * 1000, describe)
            raise
        finally:
            _in_flight(self.endpoint_name, -len(items))
        self._write(items, answered[0], (time.perf_counter() - started) * 1000, describe)

    def _recorded(self, items: Sequence[Any], call: Callable[[], list[Any]], describe: Callable[[Any], Any]) -> list[Any]:
        with self._recording(items, describe) as answered:
            answered.append(call())
        return answered[0]

    async def _arecorded(self, items: Sequence[Any], call: Callable[[], Any], describe: Callable[[Any], Any]) -> list[Any]:
        """:meth:`_recorded` for an async call: the rows are queued, never written, on the loop."""
        with self._recording(items, describe) as answered:
            answered.append(await call())
        return answered[0]

    async def achat(self, conversations, options):
        return await self._arecorded(conversations, lambda: self.inner.achat(conversations, options), _describe_text)

    async def acomplete(self, prompts, options):
        return await self._arecorded(prompts, lambda: self.inner.acomplete(prompts, options), _describe_text)

    async def aembed(self, texts):
        return await self._arecorded(texts, lambda: self.inner.aembed(texts), _describe_vector)

    def record_batch(self, results: Sequence[Any], batch_id: str, custom_ids: Sequence[str], latency_ms: float) -> None:
        """Usage rows for answers a provider's batch API gave (``ai_query`` in batch mode): source
        ``sql``, each request's ``custom_id`` as its client request id, the batch in ``usage_context``."""
        self._write(custom_ids, results, latency_ms, _describe_text, context={"usage_context": {"provider_batch": batch_id}},
                    source="sql", client_ids=custom_ids)

    def _write(self, items: Sequence[Any], results: Sequence[Any], latency_ms: float, describe: Callable[[Any], Any],
               context: dict[str, Any] | None = None, source: str | None = None,
               client_ids: Sequence[str] | None = None) -> None:
        context = request_context.get() if context is None else context
        source = source or ("rest" if context else "sql")
        function = ai_function.get()
        usage_context = json.dumps(context["usage_context"]) if context.get("usage_context") is not None else None
        now = int(time.time() * 1000)
        rows, payloads = [], []
        for position, (item, result) in enumerate(zip(items, results)):
            request_id = uuid.uuid4().hex
            rows.append((request_id, now, self.endpoint_name, self.endpoint_id, result.served_entity, current_user.get(), source,
                         result.prompt_tokens, getattr(result, "completion_tokens", 0),
                         getattr(result, "status", None) or ((result.error_status or 500) if result.error else 200),
                         round(latency_ms, 3), client_ids[position] if client_ids else context.get("client_request_id"),
                         usage_context, result.error,
                         getattr(result, "guardrail", None), function))
            if self.log_payloads:
                answer = {"error": result.error} if getattr(result, "status", None) else describe(result)
                payloads.append((request_id, self.endpoint_name, now, json.dumps(self._as_logged(item)), json.dumps(answer)))
        self.recorder.record(rows, payloads)

    def _as_logged(self, item: Any) -> Any:
        """A request as the payload table keeps it: a guarded backend masks the PII its guardrails
        look for (``GuardedBackend.redact_request``)."""
        redact = getattr(self.inner, "redact_request", None)
        return redact(item) if redact is not None else item

    def chat(self, conversations, options, on_result=None):
        return self._recorded(conversations, lambda: self.inner.chat(conversations, options, on_result), _describe_text)

    def complete(self, prompts, options, on_result=None):
        return self._recorded(prompts, lambda: self.inner.complete(prompts, options, on_result), _describe_text)

    def embed(self, texts, on_result=None):
        return self._recorded(texts, lambda: self.inner.embed(texts, on_result), _describe_vector)

    def stream(self, request, options, chat):
        started, text, last = time.perf_counter(), [], None
        describe = _describe_text
        _in_flight(self.endpoint_name, 1)
        try:
            yield from self._stream(request, options, chat, started, text, describe)
        finally:
            _in_flight(self.endpoint_name, -1)

    def _stream(self, request, options, chat, started, text, describe):
        last = None
        try:
            for delta in self.inner.stream(request, options, chat):
                text.append(delta.text)
                last = delta
                yield delta
        except SqlinferError as exc:
            self._write([request], [_Refused(error=exc.message, status=exc.http_status,
                                             guardrail=getattr(exc, "guardrail", None))],
                        (time.perf_counter() - started) * 1000, describe)
            raise
        except GeneratorExit:  # the client went away mid-stream (499, as nginx logs it)
            self._write([request], [_Refused(error="the client closed the stream", status=499)],
                        (time.perf_counter() - started) * 1000, describe)
            raise
        answered = GenerationResult(
            choices=(Choice(text="".join(text), finish_reason=last.finish_reason if last else None),),
            prompt_tokens=last.prompt_tokens if last else 0, completion_tokens=last.completion_tokens if last else 0,
            served_entity=last.served_entity if last else None, guardrail=last.guardrail if last else None)
        self._write([request], [answered], (time.perf_counter() - started) * 1000, describe)

    def predict(self, rows, params=None, on_result=None):
        return self._recorded(rows, lambda: self.inner.predict(rows, params, on_result),
                              lambda r: {"prediction": r.value, "error": r.error})


def _describe_text(result: Any) -> dict[str, Any]:
    """A text answer as the payload table keeps it."""
    return {"choices": [c.text for c in result.choices], "error": result.error}


def _describe_vector(result: Any) -> dict[str, Any]:
    return {"embedding": result.vector, "error": result.error}
