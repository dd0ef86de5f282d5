"""Real-time queries: a Databricks/OpenAI request body -> one backend call -> an OpenAI object.

Used by ``POST /serving-endpoints/{name}/invocations`` and the OpenAI-compatible
``/serving-endpoints/chat/completions``, ``/completions`` and ``/embeddings`` routes. The body is
validated here (unknown fields are named), the call goes through the same serving client as the
SQL functions, and the answer is an OpenAI ``chat.completion`` / ``text_completion`` / embedding
``list`` object. Client bookkeeping fields (``model``, ``user``, ``client_request_id``,
``usage_context``) are accepted and not sent to the model.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any, Callable, Iterator

from engine.types import CUSTOM_TASK, SamplingOptions
from serving.data.client import ServingClient
from serving.errors import InvalidParameterValue, row_error

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "stop", "n", "seed", "frequency_penalty", "presence_penalty",
                   "logit_bias")
CHAT_FIELDS = ("tools", "tool_choice", "parallel_tool_calls", "max_completion_tokens")
BOOKKEEPING_FIELDS = ("model", "user", "client_request_id", "usage_context", "stream", "stream_options", "extra_params",
                      "metadata", "store")
INPUT_FIELD = {"llm/v1/chat": "messages", "llm/v1/completions": "prompt", "llm/v1/embeddings": "input"}
# Current OpenAI chat fields that sqlinfer refuses by name (NOT_IMPLEMENTED) rather than ignores.
REFUSED_FIELDS = {
    "reasoning_effort": "no served model reasons; leave it out",
    "service_tier": "there are no service tiers here; leave it out",
    "modalities": "only text is served; leave it out",
    "audio": "only text is served; leave it out",
    "prediction": "predicted outputs are not supported; leave it out",
    "web_search_options": "no web search here; leave it out",
    "verbosity": "not supported; leave it out",
    "functions": "the legacy functions API: send tools instead",
    "function_call": "the legacy functions API: send tool_choice instead",
}


def require_task(client: ServingClient, endpoint: str, expected_task: str | None) -> str:
    """The endpoint's task, which must be what the route serves (400 naming both otherwise)."""
    return route_task(endpoint, client.task(endpoint), expected_task)


def route_task(endpoint: str, task: str, expected_task: str | None) -> str:
    """``task`` as the route serves it: a chat model also answers completions; anything else must match."""
    if expected_task == "llm/v1/completions" and task == "llm/v1/chat":
        task = expected_task  # a chat model also continues raw prompts (as vLLM's OpenAI server does)
    if expected_task is not None and task != expected_task:
        raise InvalidParameterValue(f"endpoint {endpoint!r} serves {task}; this route is for {expected_task}")
    return task


def invoke(client: ServingClient, endpoint: str, body: dict[str, Any], expected_task: str | None = None) -> tuple[dict[str, Any], str | None]:
    """Answer one query; returns (OpenAI response object, served entity that answered)."""
    task = require_task(client, endpoint, expected_task)
    if task == CUSTOM_TASK:
        if body.get("stream"):
            raise InvalidParameterValue(f"{endpoint!r} is a custom model: it answers at once; remove stream")
        return _predictions(client, endpoint, body)
    body, options = _checked(endpoint, task, body)
    if body.get("stream"):
        return _stream(client, endpoint, task, body, options), None
    query = _query(endpoint, task, body, options)
    return query.render(query.call(client, endpoint))


async def ainvoke(backend: Any, endpoint: str, endpoint_task: str, body: dict[str, Any],
                  expected_task: str | None = None) -> tuple[dict[str, Any], str | None]:
    """:func:`invoke` on the caller's event loop, for a chat, completions or embeddings query that
    is not streamed, to a backend whose whole chain is ``native_async`` (the gateway's fast path)."""
    task = route_task(endpoint, endpoint_task, expected_task)
    body, options = _checked(endpoint, task, body)
    query = _query(endpoint, task, body, options)
    return query.render(await query.acall(backend))


@dataclasses.dataclass(frozen=True)
class PreparedQuery:
    """A validated chat, completions or embeddings query: the backend call it makes and how the
    answers become the OpenAI object, the same whether it is awaited or run on a thread."""

    kind: str  # chat, complete or embed: the backend method
    requests: list[Any]
    options: SamplingOptions | None
    render: Callable[[list[Any]], tuple[dict[str, Any], str | None]]

    def call(self, client: ServingClient, endpoint: str) -> list[Any]:
        if self.kind == "embed":
            return client.embed(endpoint, self.requests)
        return getattr(client, self.kind)(endpoint, self.requests, self.options)

    async def acall(self, backend: Any) -> list[Any]:
        if self.kind == "embed":
            return await backend.aembed(self.requests)
        return await getattr(backend, "a" + self.kind)(self.requests, self.options)


def _checked(endpoint: str, task: str, body: dict[str, Any]) -> tuple[dict[str, Any], SamplingOptions | None]:
    """The body with every field checked for ``task`` (unknown and refused ones named), and its
    sampling options (None for embeddings)."""
    refused = [f"{name} ({REFUSED_FIELDS[name]})" for name in REFUSED_FIELDS if body.get(name) is not None]
    if body.get("store"):
        refused.append("store: true (completions are not stored for later retrieval; send false or leave it out)")
    if refused:
        from serving.errors import NotImplementedFeature

        raise NotImplementedFeature("not implemented by sqlinfer, refused rather than ignored: " + "; ".join(refused))
    body = {k: v for k, v in body.items() if not (k in REFUSED_FIELDS and v is None)}
    input_field = INPUT_FIELD[task]
    allowed = {input_field, *BOOKKEEPING_FIELDS} | (
        {"encoding_format"} if task == "llm/v1/embeddings" else {*SAMPLING_FIELDS, "logprobs", "top_logprobs", "response_format"})
    if task == "llm/v1/chat":
        allowed |= set(CHAT_FIELDS)
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidParameterValue(
            f"unknown field(s) {', '.join(map(repr, unknown))} for a {task} query to {endpoint!r}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )
    if input_field not in body:
        raise InvalidParameterValue(f"{input_field!r} is required for {task} endpoints such as {endpoint!r}")
    if body.get("stream") and task == "llm/v1/embeddings":
        raise InvalidParameterValue("stream=true is for chat and completions; embeddings are answered at once")
    return body, (None if task == "llm/v1/embeddings" else _options(body))


def _query(endpoint: str, task: str, body: dict[str, Any], options: SamplingOptions | None) -> PreparedQuery:
    if task == "llm/v1/embeddings":
        return _embeddings(endpoint, body["input"], body.get("encoding_format") or "float")
    if task == "llm/v1/chat":
        return PreparedQuery("chat", [_messages(body["messages"])], options, lambda results: _chat(endpoint, results))
    return _completions(endpoint, body["prompt"], options)


@dataclasses.dataclass
class StreamingAnswer:
    """``stream=true``: OpenAI chunk objects, each with the entity that answered, to send as SSE."""

    events: Iterator[tuple[dict[str, Any], str | None]]


def _stream(client, endpoint, task, body, options) -> StreamingAnswer:
    chat = task == "llm/v1/chat"
    if chat:
        request: Any = _messages(body["messages"])
    else:
        request = body["prompt"] if isinstance(body["prompt"], str) else None
        if request is None:
            raise InvalidParameterValue("prompt must be one string when stream=true")
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    shell = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
             "created": int(time.time()), "model": endpoint}

    def events() -> Iterator[tuple[dict[str, Any], str | None]]:
        first, last = True, None
        for delta in client.stream(endpoint, request, options, chat):
            last = delta
            if not delta.text and not delta.finish_reason and not delta.tool_calls and not first:
                continue
            if chat:
                piece = {"content": delta.text} | ({"role": "assistant"} if first else {})
                if delta.tool_calls:
                    piece = {"content": delta.text or None, "tool_calls": [c.openai(i) for i, c in enumerate(delta.tool_calls)]} \
                        | ({"role": "assistant"} if first else {})
                choice = {"index": 0, "delta": piece, "finish_reason": delta.finish_reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta.text, "finish_reason": delta.finish_reason, "logprobs": None}
            first = False
            chunk = shell | {"choices": [choice]}
            if delta.finish_reason and not include_usage:
                # Clients that never ask for stream_options (ChatDatabricks) read usage from any
                # chunk: the finishing one carries it. Asked for, it comes in its own chunk instead.
                chunk["usage"] = _usage(delta.prompt_tokens, delta.completion_tokens)
            yield chunk, delta.served_entity
        if include_usage and last is not None:
            yield shell | {"choices": [], "usage": _usage(last.prompt_tokens, last.completion_tokens)}, last.served_entity

    return StreamingAnswer(events())


def _predictions(client, endpoint, body) -> tuple[dict[str, Any], str | None]:
    from serving.data.custom_models import INPUT_FORMATS, rows_of

    unknown = sorted(set(body) - {*INPUT_FORMATS, "params", *BOOKKEEPING_FIELDS})
    if unknown:
        raise InvalidParameterValue(
            f"unknown field(s) {', '.join(map(repr, unknown))} for the custom model endpoint {endpoint!r}; "
            f"send one of {', '.join(INPUT_FORMATS)} (and optionally params)"
        )
    rows, params = rows_of(body)
    if not rows:
        return {"predictions": []}, None
    results = client.predict(endpoint, rows, params)
    for index, result in enumerate(results):
        if result.error:
            _raise_row_error(dataclasses.replace(result, error=f"row {index}: {result.error}"))
    return {"predictions": [r.value for r in results]}, results[0].served_entity


def _options(body: dict[str, Any]) -> SamplingOptions:
    values = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
    limit = body.get("max_completion_tokens")
    if limit is not None:  # OpenAI's current name for max_tokens (langchain-openai sends only this one)
        if values.get("max_tokens") not in (None, limit):
            raise InvalidParameterValue(f"max_tokens = {values['max_tokens']} and max_completion_tokens = {limit} "
                                        f"disagree; send one of them")
        values["max_tokens"] = limit
    for name in ("tools", "tool_choice", "parallel_tool_calls"):
        if body.get(name) is not None:
            values[name] = body[name]
    if values.get("tools") is not None:
        from serving.data.local_tools import check_tools

        check_tools(values["tools"])
    if body.get("logprobs"):
        values["logprobs"] = int(body.get("top_logprobs") or (body["logprobs"] if not isinstance(body["logprobs"], bool) else 1))
    response_format = body.get("response_format")
    if response_format:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, (dict, type(None))):
                raise InvalidParameterValue("response_format.json_schema.schema must be a JSON Schema object")
            values["json_schema"] = schema or {}
        elif kind == "json_object":
            values["json_schema"] = {"type": "object"}
        elif kind != "text":
            raise InvalidParameterValue(f"response_format.type must be text, json_object or json_schema, got {kind!r}")
    try:
        return SamplingOptions(**values)
    except ValueError as exc:
        from serving.control.wire import describe_validation_error

        raise InvalidParameterValue(describe_validation_error(exc)) from None


def _messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI chat messages, checked and normalised: ``developer`` is a system turn, content parts
    are joined to their text, and tool calls (assistant) and tool results (``tool``) are kept."""
    if not isinstance(messages, list) or not messages:
        raise InvalidParameterValue("messages must be a non-empty list of {role, content} objects")
    cleaned = []
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise InvalidParameterValue(f"messages[{index}].role must be system, developer, user, assistant or tool, "
                                        f"got {role!r}")
        content = message.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str))
        calls = message.get("tool_calls") if role == "assistant" else None
        if content is None and calls:
            content = ""
        if not isinstance(content, str):
            raise InvalidParameterValue(f"messages[{index}].content must be a string or a list of text parts")
        turn: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
        if calls:
            if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                                      and isinstance(c["function"].get("name"), str)
                                                      and _json_object_text(c["function"].get("arguments")) for c in calls):
                raise InvalidParameterValue(f"messages[{index}].tool_calls must be a list of "
                                            f"{{id, type: function, function: {{name, arguments}}}} whose arguments are "
                                            f"a JSON object as text")
            turn["tool_calls"] = [{"id": c.get("id") or f"call_{i}", "type": "function",
                                   "function": {"name": c["function"]["name"], "arguments": c["function"].get("arguments") or "{}"}}
                                  for i, c in enumerate(calls)]
        if role == "tool":
            if not isinstance(message.get("tool_call_id"), str):
                raise InvalidParameterValue(f"messages[{index}].tool_call_id is required for a tool message")
            turn["tool_call_id"] = message["tool_call_id"]
        cleaned.append(turn)
    return cleaned


def _json_object_text(arguments: Any) -> bool:
    import json

    if arguments is None:
        return True
    try:
        return isinstance(arguments, str) and isinstance(json.loads(arguments), dict)
    except ValueError:
        return False


def _raise_row_error(result: Any) -> None:
    """A failed answer as the REST error its status calls for."""
    if not result.error:
        return
    code = getattr(result, "error_code", None)
    if code is not None:  # refused by sqlinfer itself (a guardrail), not by the model: its message stands alone
        raise row_error(result.error, getattr(result, "error_status", None), code)
    raise row_error(f"the model could not answer: {result.error}", getattr(result, "error_status", None))


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _message(choice: Any) -> dict[str, Any]:
    """An answer as OpenAI's assistant message: text, or tool calls (then ``content`` is null)."""
    if choice.tool_calls:
        return {"role": "assistant", "content": choice.text or None, "tool_calls": [c.openai() for c in choice.tool_calls]}
    return {"role": "assistant", "content": choice.text}


def _chat(endpoint, results) -> tuple[dict[str, Any], str | None]:
    [result] = results
    _raise_row_error(result)
    choices = [{"index": i, "message": _message(c), "finish_reason": c.finish_reason,
                "logprobs": _logprobs(c)} for i, c in enumerate(result.choices)]
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": endpoint, "choices": choices,
            "usage": _usage(result.prompt_tokens, result.completion_tokens)}, result.served_entity


def _logprobs(choice: Any) -> dict[str, Any] | None:
    if choice.logprobs is None:
        return None
    return {"content": [{"token": p.token, "logprob": p.logprob,
                         "top_logprobs": [{"token": t, "logprob": lp} for t, lp in p.top_logprobs]} for p in choice.logprobs]}


def _completions(endpoint, prompt, options) -> PreparedQuery:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts) or not prompts:
        raise InvalidParameterValue("prompt must be a string or a non-empty list of strings")
    return PreparedQuery("complete", prompts, options, lambda results: _completions_answer(endpoint, results))


def _completions_answer(endpoint, results) -> tuple[dict[str, Any], str | None]:
    choices = []
    for result in results:
        _raise_row_error(result)
        for choice in result.choices:
            choices.append({"index": len(choices), "text": choice.text, "finish_reason": choice.finish_reason, "logprobs": None})
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": endpoint, "choices": choices,
            "usage": _usage(sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results))}, results[0].served_entity


def _embeddings(endpoint, texts, encoding: str) -> PreparedQuery:
    if encoding not in ("float", "base64"):
        raise InvalidParameterValue(f"encoding_format must be 'float' or 'base64', got {encoding!r}")
    inputs = [texts] if isinstance(texts, str) else texts
    if not isinstance(inputs, list) or not all(isinstance(t, str) for t in inputs) or not inputs:
        raise InvalidParameterValue("input must be a string or a non-empty list of strings")
    return PreparedQuery("embed", inputs, None, lambda results: _embeddings_answer(endpoint, results, encoding))


def _embeddings_answer(endpoint, results, encoding: str) -> tuple[dict[str, Any], str | None]:
    for result in results:
        _raise_row_error(result)
    data = [{"object": "embedding", "index": i, "embedding": _encode(r.vector, encoding)} for i, r in enumerate(results)]
    tokens = sum(r.prompt_tokens for r in results)
    return {"object": "list", "data": data, "model": endpoint,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}, results[0].served_entity


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    """OpenAI's base64 form: little-endian float32 bytes (what the OpenAI SDK asks for by default)."""
    if encoding == "float":
        return vector
    import base64
    import struct

    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
