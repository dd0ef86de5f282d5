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
import time
import uuid
from typing import Any

from serving.data.batch_jobs import ROUTES, BatchStore, Line, concurrency, now, output_line, parse_lines
from serving.errors import SqlinferError

log = logging.getLogger("sqlinfer.batches")
RENEW_SECONDS = 2.0


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
        """Answer the pending lines, ``concurrency()`` at a time; the job's status when it stops."""
        batch_id, task = row["id"], ROUTES[row["endpoint"]]
        owner = await asyncio.to_thread(self.service.auth.principal_named, row["owner"])
        pending = await asyncio.to_thread(self.store.pending, batch_id)
        gate = asyncio.Semaphore(concurrency())
        state = {"status": "in_progress", "renewed": time.monotonic()}

        async def one(line: Line) -> None:
            async with gate:
                if state["status"] != "in_progress":
                    return
                ok, result = await asyncio.to_thread(self._answer, owner, batch_id, task, line)
                await asyncio.to_thread(self.store.answered, batch_id, line.line, ok, result)
                if time.monotonic() - state["renewed"] > RENEW_SECONDS:
                    state["renewed"] = time.monotonic()
                    if not await asyncio.to_thread(self.store.renew, self.worker, batch_id):
                        state["status"] = "lost"  # another process took the job over: stop here
                        return
                    current = await asyncio.to_thread(self.store.row, batch_id)
                    if current["status"] != "in_progress" or now() >= current["expires_at"]:
                        state["status"] = current["status"] if current["status"] != "in_progress" else "expiring"

        await asyncio.gather(*(one(line) for line in pending))
        if state["status"] == "expiring":
            await asyncio.to_thread(self._finish, batch_id, "expired")
            return "expired"
        if state["status"] == "lost":
            return "lost"
        return (await asyncio.to_thread(self.store.row, batch_id))["status"]

    def _answer(self, owner: Any, batch_id: str, task: str, line: Line) -> tuple[bool, dict[str, Any]]:
        """One line as the owner's query: (ok, its output-file line)."""
        from serving.data.invocations import invoke
        from serving.data.limits import current_user, limit_mode
        from serving.data.usage import request_context

        current_user.set(owner.user_name)
        limit_mode.set("wait")  # a batch waits at a rate limit, as SQL jobs do
        request_context.set({"client_request_id": line.custom_id, "usage_context": {"batch_id": batch_id}})
        body = {k: v for k, v in line.body.items() if k != "stream"}
        name = body["model"]
        try:
            require_query(self.service, self.client.directory, owner, name)
            answer, _ = invoke(self.client, name, body, task)
            return True, output_line(line, 200, answer, None)
        except SqlinferError as exc:
            error = {"message": exc.message, "type": exc.error_code.lower(), "code": exc.error_code}
            return False, output_line(line, exc.http_status, {"error": error}, None)

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
