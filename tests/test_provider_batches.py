"""The provider batch clients (serving/data/provider_batches.py) against loopback servers speaking
OpenAI's Batch + Files protocol and Anthropic's Message Batches protocol (tests/fake_batch_providers.py)."""

from __future__ import annotations

import time

import pytest

from serving.data import provider_batches
from serving.data.provider_batches import AnthropicBatches, BatchItem, OpenAIBatches, split
from tests.fake_batch_providers import BatchProviderServer


@pytest.fixture
def provider():
    server = BatchProviderServer()
    yield server
    server.stop()


def items(count: int, model: str, failing: set[int] = frozenset(), **extra) -> list[BatchItem]:
    return [BatchItem(f"row-{i}", {"model": model, "messages": [{"role": "user", "content": ("FAIL " if i in failing else "") + f"row {i}"}],
                                   **extra}) for i in range(count)]


def run_to_end(client, batch_id: str) -> object:
    deadline = time.monotonic() + 30
    while not (progress := client.progress(batch_id)).ended:
        assert time.monotonic() < deadline, progress
        time.sleep(0.01)
    return progress


def test_a_thousand_requests_through_openai_batches_come_back_mapped_by_custom_id(provider):
    client = OpenAIBatches(provider.url + "/v1", "sk-test")
    requests = items(1000, "gpt-x", failing={7, 500})
    batches = split(requests, "openai", max_requests=400)
    assert [len(b) for b in batches] == [400, 400, 200]
    submitted = [client.submit(batch) for batch in batches]
    assert provider.creates["openai"] == 3 and submitted[0].custom_ids[:2] == ("row-0", "row-1")
    assert client.progress(submitted[0].batch_id).state == "in_progress"
    answers = {}
    for batch in submitted:
        progress = run_to_end(client, batch.batch_id)
        assert progress.state == "ended" and progress.total == len(batch.custom_ids)
        answers |= client.results(batch.batch_id)
    assert len(answers) == 1000
    assert answers["row-3"].text == "row 3" and answers["row-3"].prompt_tokens == 3 and answers["row-3"].error is None
    for failed in ("row-7", "row-500"):
        assert answers[failed].error_status == 400 and "scripted failure" in answers[failed].error


def test_a_thousand_requests_through_anthropic_message_batches(provider):
    client = AnthropicBatches(provider.url, "sk-ant-test")
    requests = items(1000, "claude-x", failing={12}, max_tokens=16)
    [batch] = split(requests, "anthropic")
    submitted = client.submit(batch)
    assert provider.creates["anthropic"] == 1 and client.progress(submitted.batch_id).state == "in_progress"
    progress = run_to_end(client, submitted.batch_id)
    assert (progress.total, progress.succeeded, progress.failed) == (1000, 999, 1)
    answers = client.results(submitted.batch_id)  # they come back out of order: mapped by custom_id
    assert len(answers) == 1000 and answers["row-999"].text == "row 999" and answers["row-999"].completion_tokens == 2
    assert answers["row-12"].error_status == 400 and "invalid_request_error" in answers["row-12"].error


def test_expired_and_cancelled_batches_fail_the_requests_they_did_not_answer(provider):
    openai_client = OpenAIBatches(provider.url + "/v1", "sk-test")
    provider.expire = True
    expired = openai_client.submit(items(5, "gpt-x"))
    assert run_to_end(openai_client, expired.batch_id).state == "expired"
    answers = openai_client.results(expired.batch_id)
    assert len(answers) == 5 and all("batch_expired" in a.error for a in answers.values())

    provider.expire = False
    cancelled = openai_client.submit(items(3, "gpt-x"))
    openai_client.cancel(cancelled.batch_id)
    assert run_to_end(openai_client, cancelled.batch_id).state == "cancelled"
    assert all("batch_cancelled" in a.error for a in openai_client.results(cancelled.batch_id).values())

    anthropic_client = AnthropicBatches(provider.url, "sk-ant-test")
    stopped = anthropic_client.submit(items(4, "claude-x", max_tokens=8))
    anthropic_client.cancel(stopped.batch_id)
    run_to_end(anthropic_client, stopped.batch_id)
    answers = anthropic_client.results(stopped.batch_id)
    assert len(answers) == 4 and all(a.error_status == 503 and "canceled" in a.error for a in answers.values())


def test_batches_are_split_within_the_providers_byte_limit(monkeypatch):
    monkeypatch.setitem(provider_batches.LIMITS, "openai", (50_000, 2_000))
    batches = split(items(100, "gpt-x"), "openai")
    assert len(batches) > 1 and sum(len(b) for b in batches) == 100
    assert [i.custom_id for b in batches for i in b] == [f"row-{i}" for i in range(100)]  # order kept
