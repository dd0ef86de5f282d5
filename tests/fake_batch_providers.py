"""A real HTTP server on 127.0.0.1 speaking OpenAI's Batch + Files API and Anthropic's Message Batches API.

It stands in for the providers' batch services, which are outside this machine. Shapes follow the
official SDKs' types (openai.types.Batch / FileObject, anthropic.types.messages.MessageBatch and its
results). A batch moves one state per poll: OpenAI ``validating`` -> ``in_progress`` -> ``completed``
(``expire`` makes it ``expired`` instead, its unanswered lines in the error file with code
``batch_expired``); Anthropic ``in_progress`` -> ``ended``. A request whose last user message
contains ``FAIL`` fails on its own (OpenAI: a 400 line in the error file; Anthropic: an ``errored``
result). ``creates`` counts batches created, per provider, so a test can prove none was created twice.
"""

from __future__ import annotations

import email.parser
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _text(messages: list[dict]) -> str:
    content = [m for m in messages if m["role"] == "user"][-1]["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


class BatchProviderServer:
    def __init__(self, polls_to_finish: int = 2):
        self.polls_to_finish = polls_to_finish
        self.expire = False  # OpenAI batches end expired instead of completed
        self.files: dict[str, dict] = {}
        self.openai: dict[str, dict] = {}
        self.anthropic: dict[str, dict] = {}
        self.creates = {"openai": 0, "anthropic": 0}
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def _send(self, status: int, payload, raw: bytes | None = None):
                data = raw if raw is not None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if raw is None else "application/binary")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                with owner.lock:
                    if self.path == "/v1/files":
                        return self._send(200, owner._upload(self.headers["Content-Type"], self._body()))
                    if self.path == "/v1/batches":
                        return self._send(200, owner._openai_create(json.loads(self._body())))
                    if self.path.startswith("/v1/batches/") and self.path.endswith("/cancel"):
                        batch = owner.openai[self.path.split("/")[3]]
                        batch["status"] = "cancelling"
                        return self._send(200, owner._openai_view(batch))
                    if self.path == "/v1/messages/batches":
                        return self._send(200, owner._anthropic_create(json.loads(self._body())))
                    if self.path.startswith("/v1/messages/batches/") and self.path.endswith("/cancel"):
                        batch = owner.anthropic[self.path.split("/")[4]]
                        batch["cancelled"] = True
                        return self._send(200, owner._anthropic_view(batch))
                self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_GET(self):
                with owner.lock:
                    parts = self.path.split("/")
                    if self.path.startswith("/v1/batches/"):
                        return self._send(200, owner._openai_poll(parts[3]))
                    if self.path.startswith("/v1/files/") and self.path.endswith("/content"):
                        return self._send(200, None, owner.files[parts[3]]["content"])
                    if self.path.startswith("/v1/messages/batches/") and self.path.endswith("/results"):
                        return self._send(200, None, owner._anthropic_results(parts[4]))
                    if self.path.startswith("/v1/messages/batches/"):
                        return self._send(200, owner._anthropic_poll(parts[4]))
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()

    # -- OpenAI ----------------------------------------------------------------------------------

    def _upload(self, content_type: str, body: bytes) -> dict:
        message = email.parser.BytesParser().parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
        fields = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True) for part in message.get_payload()}
        file_id = "file-" + uuid.uuid4().hex
        self.files[file_id] = {"content": fields["file"], "purpose": fields["purpose"].decode()}
        return {"id": file_id, "object": "file", "bytes": len(fields["file"]), "created_at": 0, "filename": "x.jsonl",
                "purpose": fields["purpose"].decode(), "status": "processed"}

    def _openai_create(self, body: dict) -> dict:
        self.creates["openai"] += 1
        lines = [json.loads(line) for line in self.files[body["input_file_id"]]["content"].decode().splitlines() if line.strip()]
        batch = {"id": "batch_" + uuid.uuid4().hex, "status": "validating", "polls": 0, "lines": lines,
                 "input_file_id": body["input_file_id"], "endpoint": body["endpoint"], "output_file_id": None,
                 "error_file_id": None, "completed": 0, "failed": 0}
        self.openai[batch["id"]] = batch
        return self._openai_view(batch)

    def _openai_poll(self, batch_id: str) -> dict:
        batch = self.openai[batch_id]
        batch["polls"] += 1
        if batch["status"] == "cancelling":
            self._openai_finish(batch, "cancelled")
        elif batch["status"] == "validating":
            batch["status"] = "in_progress"
        elif batch["status"] == "in_progress" and batch["polls"] >= self.polls_to_finish:
            self._openai_finish(batch, "expired" if self.expire else "completed")
        return self._openai_view(batch)

    def _openai_finish(self, batch: dict, status: str) -> None:
        ok, failed = [], []
        for line in batch["lines"]:
            text = _text(line["body"]["messages"])
            base = {"id": "batch_req_" + uuid.uuid4().hex, "custom_id": line["custom_id"]}
            if status != "completed":
                code = "batch_expired" if status == "expired" else "batch_cancelled"
                failed.append(base | {"response": None, "error": {"code": code, "message": f"not answered: {status}"}})
            elif "FAIL" in text:
                failed.append(base | {"response": {"status_code": 400, "request_id": "r", "body": {"error": {
                    "message": "scripted failure", "type": "invalid_request_error", "code": "scripted"}}}, "error": None})
            else:
                answer = {"id": "chatcmpl-x", "object": "chat.completion", "created": 0, "model": line["body"]["model"],
                          "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                          "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
                ok.append(base | {"response": {"status_code": 200, "request_id": "r", "body": answer}, "error": None})
        for kind, lines in (("output_file_id", ok), ("error_file_id", failed)):
            if lines:
                file_id = "file-" + uuid.uuid4().hex
                self.files[file_id] = {"content": "".join(json.dumps(x) + "\n" for x in lines).encode(), "purpose": "batch_output"}
                batch[kind] = file_id
        batch.update(status=status, completed=len(ok), failed=len(failed))

    @staticmethod
    def _openai_view(batch: dict) -> dict:
        return {"id": batch["id"], "object": "batch", "endpoint": batch["endpoint"], "input_file_id": batch["input_file_id"],
                "completion_window": "24h", "status": batch["status"], "created_at": 0, "output_file_id": batch["output_file_id"],
                "error_file_id": batch["error_file_id"],
                "request_counts": {"total": len(batch["lines"]), "completed": batch["completed"], "failed": batch["failed"]}}

    # -- Anthropic -------------------------------------------------------------------------------

    def _anthropic_create(self, body: dict) -> dict:
        self.creates["anthropic"] += 1
        batch = {"id": "msgbatch_" + uuid.uuid4().hex, "requests": body["requests"], "polls": 0, "ended": False, "cancelled": False}
        self.anthropic[batch["id"]] = batch
        return self._anthropic_view(batch)

    def _anthropic_poll(self, batch_id: str) -> dict:
        batch = self.anthropic[batch_id]
        batch["polls"] += 1
        if batch["cancelled"] or batch["polls"] >= self.polls_to_finish:
            batch["ended"] = True
        return self._anthropic_view(batch)

    def _anthropic_outcome(self, batch: dict, request: dict) -> str:
        if batch["cancelled"]:
            return "canceled"
        return "errored" if "FAIL" in _text(request["params"]["messages"]) else "succeeded"

    def _anthropic_view(self, batch: dict) -> dict:
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        for request in batch["requests"]:
            counts[self._anthropic_outcome(batch, request) if batch["ended"] else "processing"] += 1
        return {"id": batch["id"], "type": "message_batch", "processing_status": "ended" if batch["ended"] else (
                    "canceling" if batch["cancelled"] else "in_progress"),
                "request_counts": counts, "created_at": "2026-12-01T00:00:00Z", "expires_at": "2026-12-02T00:00:00Z",
                "ended_at": "2026-12-01T00:01:00Z" if batch["ended"] else None, "archived_at": None, "cancel_initiated_at": None,
                "results_url": f"{self.url}/v1/messages/batches/{batch['id']}/results" if batch["ended"] else None}

    def _anthropic_results(self, batch_id: str) -> bytes:
        batch = self.anthropic[batch_id]
        lines = []
        for request in reversed(batch["requests"]):  # not in request order, as the API warns
            outcome = self._anthropic_outcome(batch, request)
            if outcome == "succeeded":
                text = _text(request["params"]["messages"])
                result = {"type": "succeeded", "message": {
                    "id": "msg_x", "type": "message", "role": "assistant", "model": request["params"]["model"],
                    "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
                    "usage": {"input_tokens": 3, "output_tokens": 2}}}
            elif outcome == "errored":
                result = {"type": "errored", "error": {"type": "error", "error": {"type": "invalid_request_error",
                                                                                  "message": "scripted failure"}}}
            else:
                result = {"type": outcome}
            lines.append(json.dumps({"custom_id": request["custom_id"], "result": result}))
        return ("\n".join(lines) + "\n").encode()
