"""OpenAI's Files and Batch APIs on ``sqlinfer serve`` (issue 19, part 4), driven by the official OpenAI SDK.

Against a real server on 127.0.0.1 and the scripted OpenAI-protocol provider of
``tests/fake_providers.py`` as the endpoint's model; the restart test uses the bundled chat model
on a server subprocess that is killed half-way and started again.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import time

import pytest

from tests.registry_helpers import external_endpoint
from tests.rest_server import free_port, wait_healthy

CHAT = "/v1/chat/completions"


def jsonl(lines: list[dict]) -> io.BytesIO:
    data = io.BytesIO("".join(json.dumps(line) + "\n" for line in lines).encode())
    data.name = "requests.jsonl"
    return data


def request(custom_id: str, model: str, text: str, **extra) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": CHAT,
            "body": {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8, **extra}}


def settled(client, batch_id: str, timeout: float = 120) -> object:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired") or time.monotonic() > deadline:
            return batch
        time.sleep(0.2)


@pytest.fixture
def users(server, admin, upstream):
    """alice may query ``ext`` (on the scripted provider) but not ``walled``; bob may query nothing."""
    import openai

    service = server.service
    for name in ("ext", "walled"):
        admin.post("/api/2.0/serving-endpoints", json=external_endpoint(name, upstream.url)).raise_for_status()
    service.wait_for_deployments()
    service.set_permissions(service.endpoint_id("ext"), {"access_control_list": [
        {"user_name": "alice", "permission_level": "CAN_QUERY"}]}, replace=False)
    _, alice = service.auth.create_token("alice")
    _, bob = service.auth.create_token("bob")
    make = lambda token, prefix: openai.OpenAI(base_url=server.url + prefix, api_key=token, max_retries=0)  # noqa: E731
    return make(alice, "/v1"), make(bob, "/serving-endpoints")


def test_the_openai_sdk_runs_a_batch_with_per_line_errors_and_usage_rows(server, upstream, users):
    alice, bob = users
    lines = [request(f"r{i}", "ext", f"line {i}") for i in range(30)]
    lines.append(request("walled-off", "walled", "not mine"))
    lines.append(request("bad-temperature", "ext", "x", temperature="hot"))
    lines.append(request("bad-logprobs", "ext", "x", logprobs="maybe"))  # checked by the route's own model
    uploaded = alice.files.create(file=jsonl(lines), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes > 0
    batch = alice.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h", metadata={"job": "t"})
    assert batch.status == "validating" and batch.metadata == {"job": "t"}
    done = settled(alice, batch.id)
    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (33, 30, 3)
    assert done.in_progress_at and done.completed_at and done.output_file_id and done.error_file_id

    output = [json.loads(line) for line in alice.files.content(done.output_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in output) == sorted(f"r{i}" for i in range(30))
    for item in output:
        assert item["response"]["status_code"] == 200 and item["error"] is None
        assert item["response"]["body"]["choices"][0]["message"]["content"] == "line " + item["custom_id"][1:]
    errors = {e["custom_id"]: e for e in map(json.loads, alice.files.content(done.error_file_id).text.splitlines())}
    assert set(errors) == {"walled-off", "bad-temperature", "bad-logprobs"}
    assert errors["bad-logprobs"]["response"]["status_code"] == 400
    assert errors["walled-off"]["response"]["status_code"] == 403
    assert errors["walled-off"]["response"]["body"]["error"]["code"] == "PERMISSION_DENIED"
    assert errors["bad-temperature"]["response"]["status_code"] == 400
    assert len(upstream.calls) == 30  # nothing refused was sent

    from serving.data.usage import flush_all  # usage rows: one per answered line, the owner's, naming the batch

    flush_all()
    rows = server.service.db.read().execute(
        "SELECT requester, client_request_id, usage_context FROM usage WHERE endpoint_name = 'ext'").fetchall()
    assert len(rows) == 30 and {r["requester"] for r in rows} == {"alice"}
    assert {json.loads(r["usage_context"])["batch_id"] for r in rows} == {batch.id}
    assert sorted(r["client_request_id"] for r in rows) == sorted(f"r{i}" for i in range(30))

    import openai

    with pytest.raises(openai.NotFoundError):  # another user's batch and files are absent to bob
        bob.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        bob.files.content(done.output_file_id)
    assert [b.id for b in alice.batches.list()] == [batch.id] and list(bob.batches.list()) == []


def test_a_cancelled_batch_stops_sending_and_reports_what_was_not_sent(server, upstream, users, monkeypatch):
    alice, _ = users
    upstream.latency = 0.3
    uploaded = alice.files.create(file=jsonl([request(f"r{i}", "ext", f"line {i}") for i in range(40)]), purpose="batch")
    batch = alice.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
    deadline = time.monotonic() + 60
    while alice.batches.retrieve(batch.id).request_counts.completed < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert alice.batches.cancel(batch.id).status == "cancelling"
    done = settled(alice, batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    answered = done.request_counts.completed
    assert 4 <= answered < 40
    errors = [json.loads(line) for line in alice.files.content(done.error_file_id).text.splitlines()]
    assert len(errors) == 40 - answered and {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    time.sleep(0.5)
    assert len(upstream.calls) == answered  # nothing was sent after the lines in flight


def test_a_file_that_is_not_a_batch_fails_validation_with_the_line_named(server, users):
    alice, _ = users
    bad = alice.files.create(file=jsonl([request("a", "ext", "x"), {"custom_id": "b", "method": "POST", "url": "/v1/embeddings",
                                                                      "body": {"model": "ext", "input": "x"}}]), purpose="batch")
    done = settled(alice, alice.batches.create(input_file_id=bad.id, endpoint=CHAT, completion_window="24h").id)
    assert done.status == "failed" and "line 2" in done.errors.data[0].message
    import openai

    with pytest.raises(openai.BadRequestError) as refused:
        alice.batches.create(input_file_id=bad.id, endpoint="/v1/responses", completion_window="24h")
    assert "endpoint = '/v1/responses'" in str(refused.value)
    with pytest.raises(openai.BadRequestError):
        alice.files.create(file=jsonl([request("a", "ext", "x")]), purpose="fine-tune")


@pytest.mark.engine
@pytest.mark.slow  # two starts of the bundled engine on a server subprocess: about 2 minutes
def test_a_batch_on_the_bundled_model_survives_a_server_kill(tmp_path):
    import openai

    from serving.control.service import EndpointService

    home = tmp_path / "home"
    service = EndpointService(home)
    _, token = service.auth.create_token("carol")
    env = os.environ | {"SQLINFER_HOME": str(home), "SQLINFER_BATCH_CONCURRENCY": "1", "SQLINFER_BATCH_POLL_SECONDS": "0.2"}
    binary = os.path.join(os.path.dirname(os.sys.executable), "sqlinfer")

    def serve(port: int) -> subprocess.Popen:
        process = subprocess.Popen([binary, "serve", "--port", str(port), "--log-level", "warning"], env=env, start_new_session=True)
        wait_healthy(f"http://127.0.0.1:{port}/health", timeout=120)
        return process

    port = free_port()
    first = serve(port)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=token, max_retries=0)
    lines = [request(f"q{i}", "system-smollm2-135m-instruct", f"Say the number {i}.") for i in range(24)]
    batch = client.batches.create(input_file_id=client.files.create(file=jsonl(lines), purpose="batch").id,
                                  endpoint=CHAT, completion_window="24h")
    deadline = time.monotonic() + 300
    while client.batches.retrieve(batch.id).request_counts.completed < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # mid-job: nothing is flushed, the lease is left behind
    first.wait(timeout=30)
    killed_ms = time.time() * 1000
    with sqlite3.connect(home / "registry.db") as con:
        answered = {row[0] for row in con.execute(
            "SELECT custom_id FROM batch_job_lines WHERE batch_id = ? AND outcome IS NOT NULL", (batch.id,))}
    assert 3 <= len(answered) < 24

    second = serve(port)
    try:
        done = settled(client, batch.id, timeout=600)
        assert done.status == "completed" and done.request_counts.completed == 24
        output = [json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
        assert sorted(o["custom_id"] for o in output) == sorted(f"q{i}" for i in range(24))  # each line once
        assert all(o["response"]["body"]["choices"][0]["message"]["content"] for o in output)
    finally:
        os.killpg(second.pid, signal.SIGTERM)
        second.wait(timeout=60)
    with sqlite3.connect(home / "registry.db") as con:  # the second server sent each line left, once, and no other
        sent_after = [row[0] for row in con.execute("SELECT client_request_id FROM usage WHERE timestamp_ms > ?", (killed_ms,))]
    assert sorted(sent_after) == sorted(f"q{i}" for i in range(24) if f"q{i}" not in answered)
