"""Provider batch APIs: OpenAI's Batch + Files API and Anthropic's Message Batches API, behind one interface.

Both providers answer a batch within 24 hours at half the per-token price and without per-minute
rate limits. This module is the wire layer that a batch-mode ``ai_query`` builds on (issue 19):
split requests into batches within the provider's limits, submit one, read its status, download
its answers mapped back by ``custom_id``, and cancel it. It keeps no state of its own: the caller
commits the :class:`SubmittedBatch` (batch id and its ``custom_id`` order) the moment
:meth:`submit` returns, so a killed process re-attaches to the batch instead of paying twice.

The official SDKs are used here, as they carry protocol we would otherwise rewrite (multipart
file uploads, the results URL of a Message Batch, typed statuses). Per-request failures become
``GenerationResult(error=..., error_status=...)``, as online calls do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

from engine.types import Choice, GenerationResult

# Provider limits per batch: requests, and bytes of the input (OpenAI's file; Anthropic's request body).
LIMITS = {"openai": (50_000, 200 * 1024 * 1024), "anthropic": (100_000, 256 * 1024 * 1024)}


@dataclass(frozen=True)
class BatchItem:
    """One request of a batch: the caller's id for it and the provider's request body."""

    custom_id: str
    body: dict[str, Any]


@dataclass(frozen=True)
class SubmittedBatch:
    """What must be committed the moment a batch exists: enough to re-attach to it after a kill."""

    provider: str
    batch_id: str
    custom_ids: tuple[str, ...]


@dataclass(frozen=True)
class BatchProgress:
    """A batch's state in provider-neutral terms; ``ended`` once its answers can be downloaded."""

    state: str  # validating, in_progress, ended, failed, expired, cancelling, cancelled
    ended: bool
    total: int
    succeeded: int
    failed: int


def split(items: Sequence[BatchItem], provider: str, max_requests: int | None = None) -> list[list[BatchItem]]:
    """``items`` in consecutive batches within the provider's limits on requests and bytes."""
    limit_requests, limit_bytes = LIMITS[provider]
    limit_requests = min(limit_requests, max_requests or limit_requests)
    batches: list[list[BatchItem]] = [[]]
    size = 0
    for item in items:
        line = len(json.dumps({"custom_id": item.custom_id, "body": item.body})) + 1
        if batches[-1] and (len(batches[-1]) >= limit_requests or size + line > limit_bytes):
            batches.append([])
            size = 0
        batches[-1].append(item)
        size += line
    return [batch for batch in batches if batch]


class OpenAIBatches:
    """OpenAI's Batch API: a JSONL file uploaded with purpose ``batch``, then a batch on it."""

    provider = "openai"
    ROUTE = "/v1/chat/completions"

    def __init__(self, base_url: str, api_key: str, timeout: float = 120.0, organization: str | None = None):
        import openai

        self.sdk = openai.OpenAI(base_url=base_url, api_key=api_key, organization=organization, max_retries=2, timeout=timeout)

    def submit(self, items: Sequence[BatchItem]) -> SubmittedBatch:
        lines = "".join(json.dumps({"custom_id": i.custom_id, "method": "POST", "url": self.ROUTE, "body": i.body}) + "\n"
                        for i in items).encode()
        uploaded = self.sdk.files.create(file=("sqlinfer-batch.jsonl", lines), purpose="batch")
        batch = self.sdk.batches.create(input_file_id=uploaded.id, endpoint=self.ROUTE, completion_window="24h")
        return SubmittedBatch(self.provider, batch.id, tuple(i.custom_id for i in items))

    def progress(self, batch_id: str) -> BatchProgress:
        batch = self.sdk.batches.retrieve(batch_id)
        counts = batch.request_counts
        state = {"finalizing": "in_progress", "completed": "ended"}.get(batch.status, batch.status)
        return BatchProgress(state, batch.status in ("completed", "failed", "expired", "cancelled"),
                             counts.total if counts else 0, counts.completed if counts else 0, counts.failed if counts else 0)

    def results(self, batch_id: str) -> dict[str, GenerationResult]:
        """Every answer the batch has, by custom_id (output and error files both)."""
        batch = self.sdk.batches.retrieve(batch_id)
        answers: dict[str, GenerationResult] = {}
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            for raw in self.sdk.files.content(file_id).text.splitlines():
                if raw.strip():
                    line = json.loads(raw)
                    answers[line["custom_id"]] = _openai_answer(line)
        return answers

    def cancel(self, batch_id: str) -> None:
        self.sdk.batches.cancel(batch_id)


class AnthropicBatches:
    """Anthropic's Message Batches API: the requests in one create call, results from its results URL."""

    provider = "anthropic"

    def __init__(self, base_url: str | None, api_key: str, timeout: float = 120.0):
        import anthropic

        self.sdk = anthropic.Anthropic(base_url=base_url, api_key=api_key, max_retries=2, timeout=timeout)

    def submit(self, items: Sequence[BatchItem]) -> SubmittedBatch:
        batch = self.sdk.messages.batches.create(requests=[{"custom_id": i.custom_id, "params": i.body} for i in items])
        return SubmittedBatch(self.provider, batch.id, tuple(i.custom_id for i in items))

    def progress(self, batch_id: str) -> BatchProgress:
        batch = self.sdk.messages.batches.retrieve(batch_id)
        counts = batch.request_counts
        total = counts.processing + counts.succeeded + counts.errored + counts.canceled + counts.expired
        state = {"canceling": "cancelling"}.get(batch.processing_status, batch.processing_status)
        return BatchProgress(state, batch.processing_status == "ended", total, counts.succeeded,
                             counts.errored + counts.canceled + counts.expired)

    def results(self, batch_id: str) -> dict[str, GenerationResult]:
        return {entry.custom_id: _anthropic_answer(entry.result) for entry in self.sdk.messages.batches.results(batch_id)}

    def cancel(self, batch_id: str) -> None:
        self.sdk.messages.batches.cancel(batch_id)


def _openai_answer(line: dict[str, Any]) -> GenerationResult:
    """One line of an OpenAI batch output or error file as a GenerationResult."""
    response = line.get("response") or {}
    status = response.get("status_code")
    body = response.get("body") or {}
    if line.get("error") or status != 200:
        error = line.get("error") or body.get("error") or {}
        message = error.get("message") if isinstance(error, dict) else str(error)
        code = error.get("code") if isinstance(error, dict) else None
        return GenerationResult(error=f"the provider's batch failed this request ({code or status}): {message}",
                                error_status=status if isinstance(status, int) and status >= 400 else 502)
    from serving.data.providers import _generation

    return _generation(body, chat=True)


def _anthropic_answer(result: Any) -> GenerationResult:
    """One Message Batch result (succeeded, errored, canceled or expired) as a GenerationResult."""
    if result.type == "succeeded":
        message = result.message
        text = "".join(block.text for block in message.content if getattr(block, "type", "") == "text")
        finish = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length"}.get(message.stop_reason, message.stop_reason)
        return GenerationResult(choices=(Choice(text=text, finish_reason=finish),), prompt_tokens=message.usage.input_tokens,
                                completion_tokens=message.usage.output_tokens)
    if result.type == "errored":
        error = result.error.error
        return GenerationResult(error=f"the provider's batch failed this request ({error.type}): {error.message}", error_status=400)
    return GenerationResult(error=f"the provider's batch ended before answering this request ({result.type})", error_status=503)
