"""OpenAI-compatible batch jobs on ``sqlinfer serve``: JSONL files in, JSONL files out, run in the background.

A user uploads a JSONL file of requests (``POST /v1/files``, purpose ``batch``) and creates a
batch on it (``POST /v1/batches``). The server answers every line through the same query path
as ``POST /serving-endpoints/chat/completions`` (so permissions, rate limits, guardrails and usage
rows all apply), on behalf of the batch's owner, and writes an output file and an error file in
OpenAI's line format. Everything a job needs to go on is in the registry's SQLite database:

- ``batch_files``: uploaded and produced files (content kept in the database; the request body
  limit bounds their size);
- ``batch_jobs``: each batch's status and timestamps, with a *lease*: the worker running a job
  renews it every few seconds, so after a restart (or a crash) another server process takes the
  job over once the lease has lapsed;
- ``batch_job_lines``: each request line and, once answered, its outcome. A line answered before a
  restart is never sent again.

Statuses follow OpenAI's: ``validating`` -> ``in_progress`` -> ``finalizing`` -> ``completed``; a
file that is not valid JSONL of requests -> ``failed``; ``cancelling`` -> ``cancelled``; past its
24 h window -> ``expired``. Answered lines are kept either way.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

from serving.control.db import Database
from serving.errors import InvalidParameterValue, ResourceDoesNotExist

ROUTES = {"/v1/chat/completions": "llm/v1/chat", "/v1/completions": "llm/v1/completions", "/v1/embeddings": "llm/v1/embeddings"}
WINDOW_SECONDS = 24 * 3600
LEASE_SECONDS = 10.0
MAX_LINES = 50_000  # OpenAI's limit per batch
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")


def now() -> int:
    return int(time.time())


def concurrency() -> int:
    """``SQLINFER_BATCH_CONCURRENCY`` (default 4): lines of one job answered at once."""
    return int(os.environ.get("SQLINFER_BATCH_CONCURRENCY", "4"))


@dataclass(frozen=True)
class Line:
    """One request of a batch: its position, the caller's id for it, and the request."""

    line: int
    custom_id: str
    body: dict[str, Any]


class BatchStore:
    """Files, jobs and lines in the registry database; every read is scoped to an owner."""

    def __init__(self, db: Database):
        self.db = db

    # -- files -------------------------------------------------------------------------------

    def add_file(self, owner: str, filename: str, purpose: str, content: bytes) -> dict[str, Any]:
        file_id = "file-" + uuid.uuid4().hex
        with self.db.write() as con:
            con.execute("INSERT INTO batch_files VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (file_id, owner, purpose, filename, len(content), now(), content))
        return self.file(owner, file_id)

    def file(self, owner: str, file_id: str) -> dict[str, Any]:
        row = self.db.read().execute("SELECT id, purpose, filename, bytes, created_at FROM batch_files WHERE id = ? AND owner = ?",
                                     (file_id, owner)).fetchone()
        if row is None:  # someone else's file is as absent as a missing one
            raise ResourceDoesNotExist(f"no file {file_id!r}; list yours with GET /v1/files")
        return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
                "filename": row["filename"], "purpose": row["purpose"], "status": "processed", "expires_at": None,
                "status_details": None}

    def files(self, owner: str) -> list[dict[str, Any]]:
        rows = self.db.read().execute("SELECT id FROM batch_files WHERE owner = ? ORDER BY created_at DESC", (owner,)).fetchall()
        return [self.file(owner, row["id"]) for row in rows]

    def content(self, owner: str, file_id: str) -> bytes:
        self.file(owner, file_id)
        return self.db.read().execute("SELECT content FROM batch_files WHERE id = ?", (file_id,)).fetchone()["content"]

    # -- jobs --------------------------------------------------------------------------------

    def create(self, owner: str, input_file_id: str, endpoint: str, window: str, metadata: dict[str, str] | None) -> dict[str, Any]:
        if endpoint not in ROUTES:
            raise InvalidParameterValue(f"endpoint = {endpoint!r} is not one this server batches; use one of {', '.join(ROUTES)}")
        if window != "24h":
            raise InvalidParameterValue(f"completion_window = {window!r}: only '24h' is supported (as at OpenAI)")
        source = self.file(owner, input_file_id)
        if source["purpose"] != "batch":
            raise InvalidParameterValue(f"input_file_id = {input_file_id!r} has purpose {source['purpose']!r}; upload the "
                                        f"requests with purpose 'batch'")
        batch_id = "batch_" + uuid.uuid4().hex
        created = now()
        with self.db.write() as con:
            con.execute("INSERT INTO batch_jobs (id, owner, endpoint, input_file_id, completion_window, status, created_at, "
                        "expires_at, metadata_json) VALUES (?, ?, ?, ?, ?, 'validating', ?, ?, ?)",
                        (batch_id, owner, endpoint, input_file_id, window, created, created + WINDOW_SECONDS,
                         json.dumps(metadata) if metadata else None))
        return self.job(owner, batch_id)

    def job(self, owner: str | None, batch_id: str) -> dict[str, Any]:
        """A batch in OpenAI's shape (``owner`` None: whoever owns it, for the worker)."""
        query, args = "SELECT * FROM batch_jobs WHERE id = ?", (batch_id,)
        if owner is not None:
            query, args = query + " AND owner = ?", (batch_id, owner)
        row = self.db.read().execute(query, args).fetchone()
        if row is None:
            raise ResourceDoesNotExist(f"no batch {batch_id!r}; list yours with GET /v1/batches")
        return _batch_object(row)

    def jobs(self, owner: str, limit: int, after: str | None) -> list[dict[str, Any]]:
        rows = self.db.read().execute("SELECT * FROM batch_jobs WHERE owner = ? ORDER BY created_at DESC, id DESC", (owner,)).fetchall()
        objects = [_batch_object(row) for row in rows]
        if after is not None:
            ids = [o["id"] for o in objects]
            objects = objects[ids.index(after) + 1:] if after in ids else []
        return objects[:limit]

    def cancel(self, owner: str, batch_id: str) -> dict[str, Any]:
        job = self.job(owner, batch_id)
        if job["status"] not in ("validating", "in_progress"):
            from serving.errors import ResourceConflict

            raise ResourceConflict(f"batch {batch_id!r} is {job['status']}; only a validating or in_progress batch can be cancelled")
        with self.db.write() as con:
            con.execute("UPDATE batch_jobs SET status = 'cancelling', cancelling_at = ? WHERE id = ? AND status IN "
                        "('validating', 'in_progress')", (now(), batch_id))
        return self.job(owner, batch_id)

    # -- the worker's side -------------------------------------------------------------------

    def claim(self, worker: str) -> str | None:
        """Take one active job whose lease has lapsed (or is this worker's), for LEASE_SECONDS."""
        with self.db.write() as con:
            row = con.execute(f"SELECT id FROM batch_jobs WHERE status IN ({', '.join('?' * len(ACTIVE))}) "
                              f"AND (lease_until < ? OR lease_owner = ?) ORDER BY created_at LIMIT 1",
                              (*ACTIVE, time.time(), worker)).fetchone()
            if row is None:
                return None
            con.execute("UPDATE batch_jobs SET lease_owner = ?, lease_until = ? WHERE id = ?",
                        (worker, time.time() + LEASE_SECONDS, row["id"]))
            return row["id"]

    def renew(self, worker: str, batch_id: str) -> bool:
        """Extend this worker's lease; False if another worker has taken the job over."""
        with self.db.write() as con:
            return con.execute("UPDATE batch_jobs SET lease_until = ? WHERE id = ? AND lease_owner = ?",
                               (time.time() + LEASE_SECONDS, batch_id, worker)).rowcount == 1

    def row(self, batch_id: str) -> Any:
        return self.db.read().execute("SELECT * FROM batch_jobs WHERE id = ?", (batch_id,)).fetchone()

    def set_status(self, batch_id: str, status: str, **fields: Any) -> None:
        stamp = {"in_progress": "in_progress_at", "finalizing": "finalizing_at", "completed": "completed_at",
                 "failed": "failed_at", "expired": "expired_at", "cancelled": "cancelled_at"}.get(status)
        values = dict(fields, status=status) | ({stamp: now()} if stamp else {})
        with self.db.write() as con:
            con.execute(f"UPDATE batch_jobs SET {', '.join(f'{k} = ?' for k in values)} WHERE id = ?", (*values.values(), batch_id))

    def add_lines(self, batch_id: str, lines: list[Line]) -> None:
        with self.db.write() as con:
            con.executemany("INSERT OR IGNORE INTO batch_job_lines (batch_id, line, custom_id, request_json) VALUES (?, ?, ?, ?)",
                            [(batch_id, line.line, line.custom_id, json.dumps(line.body)) for line in lines])
            con.execute("UPDATE batch_jobs SET total = ? WHERE id = ?", (len(lines), batch_id))

    def pending(self, batch_id: str) -> list[Line]:
        rows = self.db.read().execute("SELECT line, custom_id, request_json FROM batch_job_lines WHERE batch_id = ? AND "
                                      "outcome IS NULL ORDER BY line", (batch_id,)).fetchall()
        return [Line(row["line"], row["custom_id"], json.loads(row["request_json"])) for row in rows]

    def answered(self, batch_id: str, line: int, ok: bool, result: dict[str, Any]) -> None:
        """One line's outcome, committed with the job's counts (a restart never sends it again)."""
        with self.db.write() as con:
            if con.execute("UPDATE batch_job_lines SET outcome = ?, result_json = ? WHERE batch_id = ? AND line = ? AND outcome IS NULL",
                           ("ok" if ok else "error", json.dumps(result), batch_id, line)).rowcount:
                con.execute(f"UPDATE batch_jobs SET {'completed' if ok else 'failed'} = "
                            f"{'completed' if ok else 'failed'} + 1 WHERE id = ?", (batch_id,))

    def outcomes(self, batch_id: str) -> list[tuple[str, dict[str, Any]]]:
        rows = self.db.read().execute("SELECT outcome, result_json FROM batch_job_lines WHERE batch_id = ? AND outcome IS NOT NULL "
                                      "ORDER BY line", (batch_id,)).fetchall()
        return [(row["outcome"], json.loads(row["result_json"])) for row in rows]


def parse_lines(content: bytes, endpoint: str) -> list[Line]:
    """The requests of a batch input file, or InvalidParameterValue naming the first bad line."""
    lines: list[Line] = []
    seen: set[str] = set()
    for number, raw in enumerate(content.decode("utf-8", "replace").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except ValueError:
            raise InvalidParameterValue(f"line {number}: not valid JSON") from None
        if not isinstance(item, dict) or not isinstance(item.get("custom_id"), str) or not isinstance(item.get("body"), dict):
            raise InvalidParameterValue(f"line {number}: each line is {{custom_id, method, url, body}}")
        if item.get("method", "POST") != "POST" or item.get("url") != endpoint:
            raise InvalidParameterValue(f"line {number}: method must be POST and url must be the batch's endpoint {endpoint!r}, "
                                        f"got {item.get('method')!r} {item.get('url')!r}")
        if not isinstance(item["body"].get("model"), str):
            raise InvalidParameterValue(f"line {number}: body.model must name the endpoint to query")
        if item["custom_id"] in seen:
            raise InvalidParameterValue(f"line {number}: custom_id {item['custom_id']!r} is used twice; each must be unique")
        seen.add(item["custom_id"])
        lines.append(Line(number, item["custom_id"], item["body"]))
    if not lines:
        raise InvalidParameterValue("the input file has no requests")
    if len(lines) > MAX_LINES:
        raise InvalidParameterValue(f"the input file has {len(lines)} requests; a batch takes at most {MAX_LINES}")
    return lines


def output_line(line: Line, status: int, body: dict[str, Any] | None, error: dict[str, Any] | None) -> dict[str, Any]:
    """One line of an output or error file, in OpenAI's shape."""
    return {"id": "batch_req_" + uuid.uuid4().hex, "custom_id": line.custom_id,
            "response": {"status_code": status, "request_id": uuid.uuid4().hex, "body": body} if body is not None else None,
            "error": error}


def _batch_object(row: Any) -> dict[str, Any]:
    errors = json.loads(row["errors_json"]) if row["errors_json"] else None
    return {"id": row["id"], "object": "batch", "endpoint": row["endpoint"], "errors": errors,
            "input_file_id": row["input_file_id"], "completion_window": row["completion_window"], "status": row["status"],
            "output_file_id": row["output_file_id"], "error_file_id": row["error_file_id"], "created_at": row["created_at"],
            "in_progress_at": row["in_progress_at"], "expires_at": row["expires_at"], "finalizing_at": row["finalizing_at"],
            "completed_at": row["completed_at"], "failed_at": row["failed_at"], "expired_at": row["expired_at"],
            "cancelling_at": row["cancelling_at"], "cancelled_at": row["cancelled_at"],
            "request_counts": {"total": row["total"], "completed": row["completed"], "failed": row["failed"]},
            "metadata": json.loads(row["metadata_json"]) if row["metadata_json"] else None}

