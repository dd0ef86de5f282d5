"""OpenAI's Responses API (``POST /serving-endpoints/responses``) on top of the chat path.

A Responses request is translated into a chat request (``instructions`` a system turn, ``input``
items the conversation, flat function tools the chat tools, ``text.format`` the response format,
``max_output_tokens`` the token limit), answered by the same backends as chat, and the answer is
given back as a ``response`` object: an ``output`` list of a ``message`` item with ``output_text``
and/or ``function_call`` items. ``stream: true`` sends the event sequence the OpenAI SDK's stream
helper and LangChain both read: ``response.created``, ``response.in_progress``,
``response.output_item.added``, ``response.content_part.added``, ``response.output_text.delta``...,
``response.output_item.done``, ``response.completed`` (function calls: ``output_item.added``,
``function_call_arguments.delta``/``.done``, ``output_item.done``). Conversation state on the
server (``previous_response_id``, ``store: true``) is not kept, and is refused by name.
"""

from __future__ import annotations

import copy
import time
import uuid
from typing import Any, Iterator

from serving.data.client import ServingClient
from serving.data.invocations import StreamingAnswer, _messages, _options, _raise_row_error, require_task
from serving.errors import InvalidParameterValue, NotImplementedFeature


def _chat_body(body: dict[str, Any]) -> dict[str, Any]:
    refused = [f"{name} (responses are not stored on the server; send the whole conversation as input)"
               for name in ("previous_response_id", "conversation") if body.get(name)]
    if body.get("store"):
        refused.append("store: true (responses are not stored on the server; send false or leave it out)")
    if body.get("reasoning"):
        refused.append("reasoning (no served model reasons)")
    if refused:
        raise NotImplementedFeature("not implemented by sqlinfer, refused rather than ignored: " + "; ".join(refused))
    messages: list[dict[str, Any]] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": body["instructions"]})
    given = body.get("input")
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    elif isinstance(given, list):
        for index, item in enumerate(given):
            messages.extend(_input_item(item, index))
    else:
        raise InvalidParameterValue("input must be a string or a list of input items (messages, function calls and "
                                    "their outputs)")
    chat: dict[str, Any] = {"messages": messages}
    for name in ("temperature", "top_p", "tool_choice", "parallel_tool_calls", "user", "metadata"):
        if body.get(name) is not None:
            chat[name] = body[name]
    if isinstance(chat.get("tool_choice"), dict) and "name" in chat["tool_choice"]:
        chat["tool_choice"] = {"type": "function", "function": {"name": chat["tool_choice"]["name"]}}
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    if body.get("tools"):
        chat["tools"] = [_chat_tool(tool, index) for index, tool in enumerate(body["tools"])]
    text = body.get("text") or {}
    form = text.get("format") if isinstance(text, dict) else None
    if not isinstance(form, (dict, type(None))):
        raise InvalidParameterValue("text.format must be an object: {type: text | json_object | json_schema, ...}")
    form = form or {}
    if form.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {"name": form.get("name", "response"),
                                                                          "schema": form.get("schema") or {}}}
    elif form.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    return chat


def _input_item(item: Any, index: int) -> list[dict[str, Any]]:
    if not isinstance(item, dict):
        raise InvalidParameterValue(f"input[{index}] must be an object")
    kind = item.get("type", "message")
    if kind == "message":
        content = item.get("content")
        if isinstance(content, list):
            content = "".join(part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str))
        return [{"role": item.get("role", "user"), "content": content or ""}]
    if kind == "function_call":
        return [{"role": "assistant", "content": None, "tool_calls": [{
            "id": item.get("call_id"), "type": "function",
            "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}}]}]
    if kind == "function_call_output":
        output = item.get("output")
        return [{"role": "tool", "tool_call_id": item.get("call_id"), "content": output if isinstance(output, str) else str(output)}]
    raise InvalidParameterValue(f"input[{index}].type {kind!r} is not supported; send message, function_call or "
                                f"function_call_output items")


def _chat_tool(tool: Any, index: int) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("name"), str):
        raise InvalidParameterValue(f"tools[{index}] must be a function tool {{type: function, name, description, "
                                    f"parameters}}; built-in tools (web search, files) are not available here")
    function = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
    return {"type": "function", "function": function}


def _shell(endpoint: str, body: dict[str, Any], status: str) -> dict[str, Any]:
    return {"id": f"resp_{uuid.uuid4().hex}", "object": "response", "created_at": int(time.time()), "model": endpoint,
            "status": status, "error": None, "incomplete_details": None, "instructions": body.get("instructions"),
            "metadata": body.get("metadata") or {}, "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [],
            "temperature": body.get("temperature"), "top_p": body.get("top_p"),
            "max_output_tokens": body.get("max_output_tokens"), "text": body.get("text") or {"format": {"type": "text"}},
            "output": []}


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + completion}


def _message_item(text: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []}


def _call_item(call: Any) -> dict[str, Any]:
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call.id, "name": call.name,
            "arguments": call.arguments, "status": "completed"}


def respond(client: ServingClient, endpoint: str, body: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    require_task(client, endpoint, "llm/v1/chat")
    chat = _chat_body(body)
    [result] = client.chat(endpoint, [_messages(chat["messages"])], _options(chat))
    _raise_row_error(result)
    from engine.types import Choice

    choice = result.choices[0] if result.choices else Choice(text="", finish_reason="stop")
    response = _shell(endpoint, body, "completed" if choice.finish_reason != "length" else "incomplete")
    if choice.finish_reason == "length":
        response["incomplete_details"] = {"reason": "max_output_tokens"}
    if choice.text or not choice.tool_calls:
        response["output"].append(_message_item(choice.text))
    response["output"] += [_call_item(call) for call in choice.tool_calls]
    response["usage"] = _usage(result.prompt_tokens, result.completion_tokens)
    return response, result.served_entity


def respond_stream(client: ServingClient, endpoint: str, body: dict[str, Any]) -> StreamingAnswer:
    require_task(client, endpoint, "llm/v1/chat")
    chat = _chat_body(body)
    messages, options = _messages(chat["messages"]), _options(chat)
    response = _shell(endpoint, body, "in_progress")

    def events() -> Iterator[tuple[dict[str, Any], str | None]]:
        number = iter(range(1_000_000))
        served = None
        # Events are serialized later, on another thread: each carries a copy of the response as it is now.
        yield {"type": "response.created", "sequence_number": next(number), "response": copy.deepcopy(response)}, None
        yield {"type": "response.in_progress", "sequence_number": next(number), "response": copy.deepcopy(response)}, None
        item = _message_item("", status="in_progress")
        text, last, opened = [], None, False
        for delta in client.stream(endpoint, messages, options, True):
            last, served = delta, delta.served_entity or served
            if delta.text:
                if not opened:  # the message item opens with its first text (a pure tool call has none)
                    yield {"type": "response.output_item.added", "sequence_number": next(number), "output_index": 0,
                           "item": copy.deepcopy(item)}, served
                    yield {"type": "response.content_part.added", "sequence_number": next(number), "item_id": item["id"],
                           "output_index": 0, "content_index": 0,
                           "part": {"type": "output_text", "text": "", "annotations": []}}, served
                    opened = True
                text.append(delta.text)
                yield {"type": "response.output_text.delta", "sequence_number": next(number), "item_id": item["id"],
                       "output_index": 0, "content_index": 0, "delta": delta.text, "logprobs": []}, served
            for call in delta.tool_calls:
                call_item = _call_item(call)
                index = len(response["output"]) + (1 if opened else 0)
                yield {"type": "response.output_item.added", "sequence_number": next(number), "output_index": index,
                       "item": call_item | {"arguments": "", "status": "in_progress"}}, served
                yield {"type": "response.function_call_arguments.delta", "sequence_number": next(number),
                       "item_id": call_item["id"], "output_index": index, "delta": call.arguments}, served
                yield {"type": "response.function_call_arguments.done", "sequence_number": next(number),
                       "item_id": call_item["id"], "output_index": index, "name": call.name, "arguments": call.arguments}, served
                yield {"type": "response.output_item.done", "sequence_number": next(number), "output_index": index,
                       "item": call_item}, served
                response["output"].append(call_item)
        if opened:
            done = _message_item("".join(text)) | {"id": item["id"]}
            yield {"type": "response.output_item.done", "sequence_number": next(number), "output_index": 0, "item": done}, served
            response["output"].insert(0, done)
        finished = last.finish_reason if last else "stop"
        response.update(status="incomplete" if finished == "length" else "completed",
                        usage=_usage(last.prompt_tokens if last else 0, last.completion_tokens if last else 0))
        if finished == "length":
            response["incomplete_details"] = {"reason": "max_output_tokens"}
        kind = "response.incomplete" if finished == "length" else "response.completed"
        yield {"type": kind, "sequence_number": next(number), "response": copy.deepcopy(response)}, served

    return StreamingAnswer(events())
