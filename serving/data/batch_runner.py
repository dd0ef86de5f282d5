"""The background worker that answers batch jobs (``serving.data.batch_jobs``), one per server process.

It claims one active job at a time under a lease, so several ``--workers`` processes share the
jobs and a job whose process died is taken over when its lease lapses. Lines are answered through
the same path as a REST query (``serving.data.invocations.invoke``) on behalf of the job's owner,
who must still hold CAN_QUERY on each line's endpoint: limits wait for the next window (as SQL
jobs do), and every line leaves a usage row whose ``client_request_id`` is its ``custom_id`` and
whose ``usage_context`` names the batch. ``SQLINFER_BATCH_CONCURRENCY`` lines run at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from typing import Any

from serving.data.batch_jobs import ROUTES, BatchStore, Line, concurrency, now, output_line, parse_lines
from serving.data.query_wire import ChatRequest, CompletionRequest, EmbeddingRequest
from serving.errors import SqlinferError

log = logging.getLogger("sqlinfer.batches")
RENEW_SECONDS = 2.0

# Each line's body is checked against its route's own model (serving.data.query_wire).
MODELS = {"llm/v1/chat": ChatRequest, "llm/v1/completions": CompletionRequest, "llm/v1/embeddings": EmbeddingRequest}


def require_query(service: Any, directory: Any, who: Any, name: str) -> None:
    """CAN_QUERY on ``name`` (every user may query the system endpoints). An unknown name is a 404
    that names no other endpoint."""
    from serving.control.store import SYSTEM_PREFIX
    from serving.errors import ResourceDoesNotExist

    if name.startswith(SYSTEM_PREFIX):
        if not directory.is_registered(name):
            raise ResourceDoesNotExist(f"endpoint {name!r} does not exist; list endpoints with GET /api/2.0/serving-endpoints")
        return
    service.auth.require(who, service.endpoint_id(name), name, "CAN_QUERY")


class BatchWorker:
    def __init__(self, service: Any, client: Any):
        self.service, self.client = service, client
        self.store = BatchStore(service.db)
        self.worker = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.idle_seconds = float(os.environ.get("SQLINFER_BATCH_POLL_SECONDS", "0.5"))

    async def run(self) -> None:
        """Forever: take a job, work it to its end (or until its lease is lost), repeat."""
        while True:
            try:
                batch_id = await asyncio.to_thread(self.store.claim, self.worker)
                if batch_id is None:
                    await asyncio.sleep(self.idle_seconds)
                    continue
                await self.work(batch_id)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not end the worker: the job stays active and is taken again
                log.exception("batch worker failed; retrying shortly")
                await asyncio.sleep(self.idle_seconds)

    async def work(self, batch_id: str) -> None:
        row = await asyncio.to_thread(self.store.row, batch_id)
        status = row["status"]
        if status in ("validating", "in_progress") and now() >= row["expires_at"]:
            return await asyncio.to_thread(self._finish, batch_id, "expired")
        if status == "validating":
            await asyncio.to_thread(self._validate, row)
            row = await asyncio.to_thread(self.store.row, batch_id)
            status = row["status"]
        if status == "in_progress":
            status = await self._answer_lines(row)
        if status in ("in_progress", "finalizing"):
            await asyncio.to_thread(self._finish, batch_id, "completed")
        elif status == "cancelling":
            await asyncio.to_thread(self._finish, batch_id, "cancelled")

    def _validate(self, row: Any) -> None:
        content = self.service.db.read().execute("SELECT content FROM batch_files WHERE id = ?", (row["input_file_id"],)).fetchone()
        try:
            if content is None:
                raise SqlinferError(f"the input file {row['input_file_id']!r} is gone")
            lines = parse_lines(content["content"], row["endpoint"])
        except SqlinferError as exc:
            errors = {"object": "list", "data": [{"code": "invalid_request", "message": exc.message, "param": None, "line": None}]}
            self.store.set_status(row["id"], "failed", errors_json=json.dumps(errors))
            return
        self.store.add_lines(row["id"], lines)
        with self.service.db.write() as con:  # a cancel that came while validating wins
            con.execute("UPDATE batch_jobs SET status = 'in_progress', in_progress_at = ? WHERE id = ? AND status = 'validating'",
                        (now(), row["id"]))

    async def _answer_lines(self, row: Any) -> str:
        """Answer the pending lines, ``concurrency()`` at a time; the job's status when it stops.

        The lease is renewed by a timer of its own, not between lines: lines that run long (a
        long generation, a rate-limit wait) must not let it lapse, or another process would
        take the job over and send them again. Once a renewal fails, no line is started.
        """
        batch_id, task = row["id"], ROUTES[row["endpoint"]]
        owner = await asyncio.to_thread(self.service.auth.principal_named, row["owner"])
        pending = await asyncio.to_thread(self.store.pending, batch_id)
        gate = asyncio.Semaphore(concurrency())
        state = {"status": "in_progress"}

        async def keep_lease() -> None:
            while state["status"] == "in_progress":
                await asyncio.sleep(RENEW_SECONDS)
                if not await asyncio.to_thread(self.store.renew, self.worker, batch_id):
                    state["status"] = "lost"  # another process took the job over: start nothing more
                    return
                current = await asyncio.to_thread(self.store.row, batch_id)
                if current["status"] != "in_progress":
                    state["status"] = current["status"]  # cancelling
                elif now() >= current["expires_at"]:
                    state["status"] = "expiring"

        async def one(line: Line) -> None:
            async with gate:
                if state["status"] != "in_progress":
                    return
                ok, result = await asyncio.to_thread(self._answer, owner, batch_id, task, line)
                await asyncio.to_thread(self.store.answered, batch_id, line.line, ok, result)

        renewing = asyncio.create_task(keep_lease())
        try:
            await asyncio.gather(*(one(line) for line in pending))
        finally:
            if state["status"] == "in_progress":
                state["status"] = "done"
            renewing.cancel()
        if state["status"] == "expiring":
            await asyncio.to_thread(self._finish, batch_id, "expired")
            return "expired"
        if state["status"] == "lost":
            return "lost"
        return (await asyncio.to_thread(self.store.row, batch_id))["status"]

    def _answer(self, owner: Any, batch_id: str, task: str, line: Line) -> tuple[bool, dict[str, Any]]:
        """One line as the owner's query: (ok, its output-file line). The body is checked against
        the route's own model first, so a line is refused exactly as the route would refuse it."""
        from pydantic import ValidationError

        from serving.control.wire import describe_validation_error
        from serving.data.invocations import invoke
        from serving.data.limits import current_user, limit_mode
        from serving.data.query_wire import body_of
        from serving.data.usage import request_context
        from serving.errors import InvalidParameterValue

        current_user.set(owner.user_name)
        limit_mode.set("wait")  # a batch waits at a rate limit, as SQL jobs do
        request_context.set({"client_request_id": line.custom_id, "usage_context": {"batch_id": batch_id}})
        try:
            try:
                body = body_of(MODELS[task].model_validate({k: v for k, v in line.body.items() if k != "stream"}))
            except ValidationError as exc:
                raise InvalidParameterValue(f"line {line.line}: {describe_validation_error(exc)}") from None
            name = body["model"]
            require_query(self.service, self.client.directory, owner, name)
            answer, _ = invoke(self.client, name, body, task)
            return True, output_line(line, 200, answer, None)
        except SqlinferError as exc:
            error = {"message": exc.message, "type": exc.error_code.lower(), "code": exc.error_code}
            return False, output_line(line, exc.http_status, {"error": error}, None)
        except Exception as exc:  # noqa: BLE001  (a bug: this line fails, the job goes on)
            log.error("internal error answering line %s of %s: %s", line.line, batch_id, type(exc).__name__)
            error = {"message": "internal error in sqlinfer; the server log has the details", "type": "internal_error",
                     "code": "INTERNAL_ERROR"}
            return False, output_line(line, 500, {"error": error}, None)

    def _finish(self, batch_id: str, status: str) -> None:
        """Write the output and error files of what was answered, then set the final status.
        Lines never answered (cancelled or expired) go to the error file with that reason."""
        row = self.store.row(batch_id)
        ok_lines, error_lines = [], []
        for outcome, result in self.store.outcomes(batch_id):
            (ok_lines if outcome == "ok" else error_lines).append(result)
        if status in ("cancelled", "expired"):
            code = "batch_cancelled" if status == "cancelled" else "batch_expired"
            for line in self.store.pending(batch_id):
                error_lines.append(output_line(line, 0, None, {"code": code, "message": f"the batch was {status} before "
                                                                                     f"this request was sent"}))
        else:
            self.store.set_status(batch_id, "finalizing")
        files = {}
        for kind, lines in (("output", ok_lines), ("error", error_lines)):
            if lines:
                content = "".join(json.dumps(line) + "\n" for line in lines).encode()
                files[f"{kind}_file_id"] = self.store.add_file(row["owner"], f"{batch_id}_{kind}.jsonl", "batch_output", content)["id"]
        self.store.set_status(batch_id, status, lease_until=0, **files)
