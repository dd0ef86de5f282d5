"""Provider batch mode for ``ai_query``: a query's external calls through OpenAI's or Anthropic's batch API.

Batch APIs answer within 24 hours at half the per-token price, so a query in batch mode runs in
three steps (:func:`connectors.duckdb.execute_batched`, ``sqlinfer sql --batch-mode``):

1. **Plan.** The query runs once with the functions recording what they would send (as
   ``explain`` does); no model is called.
2. **Prefetch** (:func:`prefetch`). Each chat request to an OpenAI or Anthropic endpoint is
   rendered exactly as the online path renders it and keyed by a hash of (endpoint, its config
   version, the sampling options, the messages). Keys the ledger already knows are *re-attached*
   to their batch; the rest are split into provider batches within the provider's limits and
   submitted. Each batch's id and keys are committed to the ledger the moment the batch exists,
   so a killed process that runs the query again submits nothing twice. The batches are then
   polled until they end, and every answer (a failure too) is written to the ledger as it is
   downloaded.
3. **Run.** The query runs for real with a client (:class:`BatchAnsweringClient`) that answers
   those requests from the ledger: per-row failures become ``failOnError`` errors exactly as
   online. A request the ledger does not hold (a STRUCT prompt whose field order came out
   differently in this chunk) is sent online, and counted.

The ledger is ``$SQLINFER_HOME/provider_batches.db`` (SQLite, WAL).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ai_functions.errors import InvalidArgument
from ai_functions.functions import KIND_OF_TASK, _dedupe, request_options
from ai_functions.ordering import prompts_for
from engine.types import GenerationResult


@dataclass
class PrefetchReport:
    """What step 2 did: batches submitted now, re-attached from an earlier run, and the requests."""

    submitted: list[str] = field(default_factory=list)
    reattached: list[str] = field(default_factory=list)
    requests: int = 0
    answered_before: int = 0  # requests whose answers an earlier run had already downloaded
    sent_online: int = 0  # requests step 3 did not find in the ledger and sent online


class BatchLedger:
    """Provider batches and the requests in them, in one SQLite file shared by every process."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._write() as con:
            con.execute("CREATE TABLE IF NOT EXISTS batches (batch_id TEXT PRIMARY KEY, provider TEXT NOT NULL, "
                        "endpoint TEXT NOT NULL, requests INTEGER NOT NULL, state TEXT NOT NULL, created_ms INTEGER NOT NULL, "
                        "ended_ms INTEGER)")
            con.execute("CREATE TABLE IF NOT EXISTS requests (key TEXT PRIMARY KEY, batch_id TEXT NOT NULL, "
                        "result_json TEXT)")

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = self._local.con = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            con.execute("PRAGMA journal_mode=WAL")
        return con

    class _Transaction:
        def __init__(self, con: sqlite3.Connection):
            self.con = con

        def __enter__(self) -> sqlite3.Connection:
            self.con.execute("BEGIN IMMEDIATE")
            return self.con

        def __exit__(self, kind, *_: Any) -> None:
            self.con.execute("COMMIT" if kind is None else "ROLLBACK")

    def _write(self) -> "BatchLedger._Transaction":
        return BatchLedger._Transaction(self._con())

    def known(self, keys: Sequence[str]) -> dict[str, tuple[str, str | None]]:
        """key -> (batch id, result JSON or None while the batch runs), for the keys the ledger holds."""
        found: dict[str, tuple[str, str | None]] = {}
        con = self._con()
        for start in range(0, len(keys), 500):
            part = list(keys[start:start + 500])
            rows = con.execute(f"SELECT key, batch_id, result_json FROM requests WHERE key IN ({', '.join('?' * len(part))})", part)
            found.update({key: (batch_id, result) for key, batch_id, result in rows})
        return found

    def submitted(self, provider: str, endpoint: str, batch_id: str, keys: Sequence[str]) -> None:
        """Commit a batch and its keys: the moment it exists, before anything else happens."""
        with self._write() as con:
            con.execute("INSERT INTO batches VALUES (?, ?, ?, ?, 'in_progress', ?, NULL)",
                        (batch_id, provider, endpoint, len(keys), int(time.time() * 1000)))
            con.executemany("INSERT OR REPLACE INTO requests VALUES (?, ?, NULL)", [(key, batch_id) for key in keys])

    def ended(self, batch_id: str, state: str, results: dict[str, str], missing: str) -> bool:
        """A batch's answers (key -> result JSON), written as they are downloaded; its keys the
        provider did not answer get ``missing``. False when another process ended it first."""
        with self._write() as con:
            if con.execute("UPDATE batches SET state = ?, ended_ms = ? WHERE batch_id = ? AND state = 'in_progress'",
                           (state, int(time.time() * 1000), batch_id)).rowcount == 0:
                return False
            con.executemany("UPDATE requests SET result_json = ? WHERE key = ? AND batch_id = ?",
                            [(result, key, batch_id) for key, result in results.items()])
            con.execute("UPDATE requests SET result_json = ? WHERE batch_id = ? AND result_json IS NULL", (missing, batch_id))
            return True

    def batches(self) -> list[dict[str, Any]]:
        rows = self._con().execute("SELECT batch_id, provider, endpoint, requests, state, created_ms, ended_ms FROM batches "
                                   "ORDER BY created_ms").fetchall()
        return [dict(zip(("batch_id", "provider", "endpoint", "requests", "state", "created_ms", "ended_ms"), row)) for row in rows]


def default_ledger() -> BatchLedger:
    from engine.model_store import sqlinfer_home

    return BatchLedger(sqlinfer_home() / "provider_batches.db")


def request_key(endpoint: str, version: str | None, options: Any, messages: list[dict[str, Any]]) -> str:
    """What a request is known by in the ledger (64 hex characters: also its custom_id)."""
    text = json.dumps([endpoint, version, options.model_dump(exclude_none=True, mode="json"), messages], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class BatchTarget:
    """An endpoint as batch mode reaches it: the provider's batch client, how one request's body
    is shaped for it, the usage recorder of the endpoint, and the served entity that answers."""

    provider: Any
    shape: Callable[[list[dict[str, Any]], Any], dict[str, Any]]
    usage: Any
    entity: str | None


def batch_provider(client: Any, endpoint: str, control_only: bool = False) -> BatchTarget | None:
    """How batch mode reaches ``endpoint``, or None when it is not an OpenAI or Anthropic external
    model (not an Azure one, not a custom provider). ``control_only``: to read or cancel a batch
    already submitted (guardrails do not stop that)."""
    from serving.data.provider_batches import AnthropicBatches, OpenAIBatches
    from serving.data.providers import AnthropicBackend, OpenAICompatibleBackend, _openai_kwargs
    from serving.data.guardrails import GuardedBackend
    from serving.data.usage import UsageRecordingBackend

    directory = getattr(client, "directory", None)
    backend = directory.backend(endpoint) if directory is not None else None
    usage, entity, seen = None, None, 0
    while backend is not None and not isinstance(backend, (OpenAICompatibleBackend, AnthropicBackend)) and seen < 16:
        check = getattr(backend, "_check", None)
        if check is not None:  # the egress allow-list holds for batches as for online calls
            check()
        if isinstance(backend, GuardedBackend) and not control_only:
            raise InvalidArgument(f"{endpoint!r} has AI Gateway guardrails, which batch mode does not apply; "
                                  f"run the query online (without --batch-mode)")
        usage = usage or (backend if isinstance(backend, UsageRecordingBackend) else None)
        entity = entity or getattr(backend, "entity", None)
        backend = getattr(backend, "inner", None) or getattr(backend, "primary", None)
        seen += 1
    if isinstance(backend, OpenAICompatibleBackend) and backend.native_async and backend.provider == "openai":
        model = backend.model
        return BatchTarget(OpenAIBatches(backend.base_url, backend._resolve_key(), organization=backend._organization),
                           lambda messages, options: {"model": model, "messages": messages, **_openai_kwargs(options)},
                           usage, entity)
    if isinstance(backend, AnthropicBackend):
        import os

        model = backend.model

        def anthropic_params(messages: list[dict[str, Any]], options: Any) -> dict[str, Any]:
            params: dict[str, Any] = {"model": model, "max_tokens": options.max_tokens or backend.DEFAULT_MAX_TOKENS,
                                      "messages": [m for m in messages if m["role"] != "system"]}
            system = "\n".join(m["content"] for m in messages if m["role"] == "system")
            if system:
                params["system"] = system
            for name in ("temperature", "top_p"):
                if getattr(options, name) is not None:
                    params[name] = getattr(options, name)
            if options.stop:
                params["stop_sequences"] = list(options.stop)
            return params
        return BatchTarget(AnthropicBatches(os.environ.get("ANTHROPIC_BASE_URL"), backend._resolve_key()), anthropic_params,
                           usage, entity)
    return None


@dataclass(frozen=True)
class BatchCounts:
    """The progress of a query's provider batches: what its progress bar shows."""

    submitted: int  # batches of this query at the provider (created now or re-attached)
    in_progress: int
    completed: int


def prefetch(client: Any, planner: Any, ledger: BatchLedger, poll_seconds: float = 30.0,
             progress: Callable[[str], None] | None = None, max_requests: int | None = None,
             on_counts: Callable[[BatchCounts], None] | None = None) -> PrefetchReport:
    """Step 2 for every ai_query call the planner recorded (see the module docstring)."""
    from serving.data.batch_wire import encode_result
    from serving.data.provider_batches import BatchItem, split
    from serving.data.usage import ai_function

    report = PrefetchReport()
    if planner.calls and getattr(client, "directory", None) is None:
        raise InvalidArgument("batch mode submits the provider batches from this process: leave out --server "
                              "(SQLINFER_SERVER) and run the query with the registry at hand")
    targets: dict[str, BatchTarget] = {}  # per endpoint: its own base URL, key and usage rows
    for call in planner.calls.values():
        if call.function != "ai_query" or not call.requests:
            continue
        kind = KIND_OF_TASK[client.task(call.endpoint)]
        found = batch_provider(client, call.endpoint)
        if kind != "chat" or found is None:
            raise InvalidArgument(f"batch mode sends chat requests to OpenAI or Anthropic external endpoints; "
                                  f"{call.endpoint!r} serves {client.task(call.endpoint)} here. Run the query online "
                                  f"(without --batch-mode), or point it at such an endpoint")
        provider, shape = found.provider, found.shape
        targets[call.endpoint] = found
        options = request_options(call.parameters, call.spec, kind)
        if options.tools:
            raise InvalidArgument("batch mode does not send tools; remove them from modelParameters or run online")
        distinct, _ = _dedupe(call.requests)
        conversations = _conversations(distinct)
        version = client.config_version(call.endpoint)
        keys = [request_key(call.endpoint, version, options, c) for c in conversations]
        known = {key: found for key, found in ledger.known(keys).items() if not _failed(found[1])}  # failures go again
        report.requests += len(keys)
        report.answered_before += sum(1 for key in keys if key in known and known[key][1] is not None)
        report.reattached += sorted({known[key][0] for key in keys if key in known and known[key][1] is None})
        fresh = [BatchItem(key, shape(c, options)) for key, c in zip(keys, conversations) if key not in known]
        fresh = list({item.custom_id: item for item in fresh}.values())
        for part in split(fresh, provider.provider, max_requests):
            submitted = provider.submit(part)
            ledger.submitted(provider.provider, call.endpoint, submitted.batch_id, submitted.custom_ids)
            report.submitted.append(submitted.batch_id)
            if progress:
                progress(f"submitted {submitted.batch_id} ({len(part)} requests) to {provider.provider}")
    mine = set(report.submitted) | set(report.reattached)
    open_batches = {batch["batch_id"]: batch for batch in ledger.batches() if batch["state"] == "in_progress"
                    and batch["batch_id"] in mine}
    total = len(mine)
    while True:
        if on_counts:
            on_counts(BatchCounts(total, len(open_batches), total - len(open_batches)))
        if not open_batches:
            return report
        for batch_id, batch in sorted(open_batches.items()):
            target = targets[batch["endpoint"]]
            state = target.provider.progress(batch_id)
            if progress:
                progress(f"{batch_id}: {state.state}, {state.succeeded + state.failed} of {state.total} done")
            if not state.ended:
                continue
            answers = target.provider.results(batch_id)
            if target.entity:
                answers = {key: dataclasses.replace(result, served_entity=target.entity) for key, result in answers.items()}
            unanswered = GenerationResult(error=f"the provider's batch {batch_id} ended ({state.state}) without answering "
                                                f"this request; run the query again to send it again", error_status=503)
            first = ledger.ended(batch_id, state.state, {key: json.dumps(encode_result(result)) for key, result in answers.items()},
                                 json.dumps(encode_result(unanswered)))
            if first and target.usage is not None and answers:  # one usage row per answered request, naming the batch
                named = ai_function.set("ai_query")
                try:
                    target.usage.record_batch(list(answers.values()), batch_id, list(answers), time.time() * 1000 - batch["created_ms"])
                finally:
                    ai_function.reset(named)
            del open_batches[batch_id]
        if open_batches:
            time.sleep(poll_seconds)


def _failed(result_json: str | None) -> bool:
    """A stored answer that is a failure: sent again by the next run, as an online failure would be."""
    return result_json is not None and json.loads(result_json).get("error") is not None


def _conversations(requests: Sequence[Any]) -> list[list[dict[str, Any]]]:
    """Requests as the online path sends them: a string is the user message; STRUCTs become
    ``field: value`` prompts with the fields ordered for shared prefixes."""
    structured = [r for r in requests if isinstance(r, dict)]
    rendered = dict(zip(map(id, structured), prompts_for(structured)))
    return [[{"role": "user", "content": r if isinstance(r, str) else rendered[id(r)]}] for r in requests]


class BatchAnsweringClient:
    """A ServingClient whose chat calls are answered from the ledger (step 3); misses go online."""

    def __init__(self, inner: Any, ledger: BatchLedger, endpoints: set[str]):
        self.inner, self.ledger, self.endpoints = inner, ledger, endpoints
        self.sent_online = 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def chat(self, endpoint, conversations, options, on_result=None):
        if endpoint not in self.endpoints:
            return self.inner.chat(endpoint, conversations, options, on_result)
        from serving.data.batch_wire import decode_result

        version = self.inner.config_version(endpoint)
        keys = [request_key(endpoint, version, options, list(c)) for c in conversations]
        known = self.ledger.known(keys)
        results: list[Any] = [None] * len(keys)
        missing = []
        for index, key in enumerate(keys):
            answer = known.get(key, (None, None))[1]
            if answer is None:
                missing.append(index)
                continue
            results[index] = decode_result("chat", json.loads(answer))
            if on_result is not None:
                on_result(index, results[index])
        if missing:
            with self._lock:
                self.sent_online += len(missing)

            def forward(local: int, result: Any) -> None:
                if on_result is not None:
                    on_result(missing[local], result)

            for index, result in zip(missing, self.inner.chat(endpoint, [conversations[i] for i in missing], options, forward)):
                results[index] = result
        return results
