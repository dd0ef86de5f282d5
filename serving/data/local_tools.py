"""Tool calling on the local engine, which has no tool parser of its own here.

vLLM's tool calling lives in its OpenAI server (per-model parsers and chat templates that know
tools); sqlinfer drives ``AsyncLLM`` directly, and the bundled model's template knows no tools. So
tools are carried in ways that hold for any chat model:

* ``tool_choice`` ``"required"`` or a named function: the answer is *constrained* with structured
  output to ``{"name": <one of the tools>, "arguments": <that tool's parameters schema>}``, so it is
  always a valid call (one call per answer).
* ``tool_choice`` ``"auto"`` (the default when tools are given): the tools are described in a
  system message, with the instruction to answer with only that JSON object to call one; an answer
  that parses as such a call becomes a tool call, anything else stays text. How well this works
  depends on the model (a 135M model rarely chooses a tool by itself).
* ``"none"``: the tools are ignored.

Earlier tool calls and results in the conversation are rendered as text turns (the call as its
JSON, the result as a ``tool`` turn), which every chat template accepts.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any, Sequence

from engine.types import Choice, GenerationResult, SamplingOptions, ToolCall
from serving.errors import InvalidParameterValue

AUTO_INSTRUCTION = ("You can call these functions. To call one, answer with only a JSON object "
                    '{"name": <function name>, "arguments": {<its parameters>}} and nothing else; '
                    "otherwise answer normally.\nFunctions:\n")


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one request's tools are carried: ``mode`` is None, "forced" or "auto"."""

    mode: str | None
    names: tuple[str, ...] = ()


def check_tools(tools: Any) -> None:
    """Refuse tools that are not OpenAI function tools, naming the bad one (before any call)."""
    if not isinstance(tools, (list, tuple)):
        raise InvalidParameterValue("tools must be a list of {\"type\": \"function\", \"function\": {...}} objects")
    _functions(tools)


def _functions(tools: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    functions = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str):
            raise InvalidParameterValue(f"tools[{index}] must be {{\"type\": \"function\", \"function\": {{\"name\", "
                                        f"\"description\", \"parameters\"}}}}; only function tools are supported")
        functions.append(function)
    return functions


def prepare(conversations: Sequence[Sequence[dict[str, Any]]], options: SamplingOptions
            ) -> tuple[list[list[dict[str, str]]], SamplingOptions, Plan]:
    """Conversations and options as the engine takes them, and the plan to read the answers back."""
    rendered = [[_as_text_turn(m) for m in messages] for messages in conversations]
    if not options.tools or options.tool_choice == "none":
        return rendered, options.model_copy(update={"tools": None, "tool_choice": None, "parallel_tool_calls": None}), Plan(None)
    functions = _functions(options.tools)
    names = tuple(f["name"] for f in functions)
    choice = options.tool_choice or "auto"
    base = {"tools": None, "tool_choice": None, "parallel_tool_calls": None}
    if choice == "auto":
        described = json.dumps([{k: f[k] for k in ("name", "description", "parameters") if k in f} for f in functions])
        system = {"role": "system", "content": AUTO_INSTRUCTION + described}
        return [[system, *messages] for messages in rendered], options.model_copy(update=base), Plan("auto", names)
    if choice == "required":
        chosen = functions
    elif isinstance(choice, dict) and isinstance((choice.get("function") or {}).get("name"), str):
        name = choice["function"]["name"]
        chosen = [f for f in functions if f["name"] == name]
        if not chosen:
            raise InvalidParameterValue(f"tool_choice names {name!r}, which is not among the tools ({', '.join(names)})")
    else:
        raise InvalidParameterValue(f"tool_choice must be 'auto', 'none', 'required' or {{\"type\": \"function\", "
                                    f"\"function\": {{\"name\": ...}}}}, got {choice!r}")
    schemas = [{"type": "object", "properties": {"name": {"type": "string", "enum": [f["name"]]},
                                                 "arguments": f.get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"]} for f in chosen]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    return rendered, options.model_copy(update=base | {"json_schema": schema}), Plan("forced", names)


def finish(results: Sequence[GenerationResult], plan: Plan) -> list[GenerationResult]:
    """Answers that are calls (forced, or parsed in auto mode) as tool calls."""
    if plan.mode is None:
        return list(results)
    finished = []
    for result in results:
        if result.error:
            finished.append(result)
            continue
        choices = []
        for choice in result.choices:
            call = _as_call(choice.text, plan.names)
            if call is None and plan.mode == "forced":  # cut short (max_tokens): say so rather than invent
                choices.append(Choice(text=choice.text, finish_reason=choice.finish_reason or "length"))
            elif call is None:
                choices.append(choice)
            else:
                choices.append(Choice(text="", finish_reason="tool_calls", tool_calls=(call,)))
        finished.append(dataclasses.replace(result, choices=tuple(choices)))
    return finished


def _as_call(text: str, names: tuple[str, ...]) -> ToolCall | None:
    stripped = text.strip()
    if stripped.startswith("```"):
        stripped = stripped.strip("`").removeprefix("json").strip()
    try:
        value = json.loads(stripped)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", {})
    if not isinstance(arguments, dict):
        return None
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=value["name"], arguments=json.dumps(arguments))


def _as_text_turn(message: dict[str, Any]) -> dict[str, str]:
    """One OpenAI message as a role/content turn any chat template takes."""
    role, content = message["role"], message.get("content") or ""
    if role == "assistant" and message.get("tool_calls"):
        calls = [{"name": c["function"]["name"], "arguments": json.loads(c["function"].get("arguments") or "{}")}
                 for c in message["tool_calls"]]
        return {"role": "assistant", "content": json.dumps(calls[0] if len(calls) == 1 else calls)}
    if role == "tool":
        return {"role": "tool", "content": content}
    return {"role": role, "content": content}
