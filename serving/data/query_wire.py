"""Query request bodies, typed: what ``/invocations`` and the OpenAI-compatible routes accept.

The REST edge declares these as route bodies, so ``/openapi.json`` documents every field and an
unknown one is refused by name before anything runs. Which fields a given endpoint takes depends
on its task (chat, completions, embeddings, custom model), known only once the endpoint is
looked up: :func:`serving.data.invocations.invoke` checks that, and the values' ranges.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_CONTEXT_BYTES = 4096
MAX_ITEMS = 10_000  # messages, prompts or texts in one real-time request


class _Query(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # bookkeeping: accepted, never sent to a model
    model: str | None = Field(default=None, description="the endpoint name (OpenAI routes)")
    user: str | None = Field(default=None, max_length=256)
    client_request_id: str | None = Field(default=None, max_length=256, description="recorded in the usage table")
    usage_context: dict[str, Any] | None = Field(default=None, max_length=64, description="recorded in the usage table")
    extra_params: dict[str, Any] | None = None

    @field_validator("usage_context")
    @classmethod
    def _bounded_context(cls, value: Any) -> Any:
        # copied into the usage row of every request of the body: kept small
        if value is not None and len(json.dumps(value, default=str)) > MAX_CONTEXT_BYTES:
            raise ValueError(f"usage_context is larger than {MAX_CONTEXT_BYTES} bytes as JSON; send a smaller one")
        return value


class _Sampling(_Query):
    max_tokens: int | None = None
    max_completion_tokens: int | None = Field(default=None, description="OpenAI's current name for max_tokens")
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    seed: int | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    metadata: dict[str, Any] | None = Field(default=None, description="accepted, not used")
    store: bool | None = Field(default=None, description="false only: completions are not stored")
    # Refused by name (NOT_IMPLEMENTED) when given, with the reason; see serving.data.invocations.
    reasoning_effort: Any = None
    service_tier: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    verbosity: Any = None


class _Tools(BaseModel):
    tools: list[dict[str, Any]] | None = Field(default=None, description="OpenAI function tools")
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: Any = None  # the legacy functions API: refused by name
    function_call: Any = None


class ChatRequest(_Sampling, _Tools):
    """``POST /serving-endpoints/chat/completions`` (OpenAI chat completions)."""

    model: str = Field(description="the endpoint name")
    messages: list[dict[str, Any]] = Field(max_length=MAX_ITEMS)


class CompletionRequest(_Sampling):
    """``POST /serving-endpoints/completions`` (OpenAI completions)."""

    model: str = Field(description="the endpoint name")
    prompt: str | list[str] = Field(max_length=MAX_ITEMS)


class EmbeddingRequest(_Query):
    """``POST /serving-endpoints/embeddings`` (OpenAI embeddings)."""

    model: str = Field(description="the endpoint name")
    input: str | list[str] = Field(max_length=MAX_ITEMS)
    encoding_format: str | None = None
    stream: bool | None = None


class InvocationRequest(_Sampling, _Tools):
    """``POST /serving-endpoints/{name}/invocations``: one of ``messages`` (chat), ``prompt``
    (completions), ``input`` (embeddings), or a custom model's ``dataframe_split`` /
    ``dataframe_records`` / ``instances`` / ``inputs`` (+ ``params``)."""

    messages: list[dict[str, Any]] | None = None
    prompt: str | list[str] | None = None
    input: str | list[str] | None = None
    encoding_format: str | None = None
    dataframe_split: dict[str, Any] | None = None
    dataframe_records: list[Any] | None = None
    instances: list[Any] | None = None
    inputs: Any = None
    params: dict[str, Any] | None = None


def body_of(request: BaseModel) -> dict[str, Any]:
    """A validated body as the plain dict ``invoke`` reads (only the fields the client sent)."""
    return request.model_dump(exclude_unset=True)


class ResponsesRequest(BaseModel):
    """``POST /serving-endpoints/responses`` (OpenAI's Responses API, answered by the chat path)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="the endpoint name")
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    stream: bool | None = None
    text: dict[str, Any] | None = Field(default=None, description="{format: text | json_object | json_schema}")
    metadata: dict[str, Any] | None = None
    user: str | None = None
    store: bool | None = Field(default=None, description="false only: responses are not stored")
    truncation: str | None = Field(default=None, description="accepted; a prompt longer than the context fails")
    # Refused by name (NOT_IMPLEMENTED) when given: conversation state is not kept on the server.
    previous_response_id: str | None = None
    conversation: Any = None
    reasoning: dict[str, Any] | None = None
