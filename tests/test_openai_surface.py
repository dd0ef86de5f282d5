"""The OpenAI surface current clients use, with the official OpenAI SDK against a real server:
max_completion_tokens, tools (an OpenAI-protocol provider and an Anthropic one on 127.0.0.1, and
the local engine), /models, the Responses API, fields refused by name, and streams that never lose
an answer."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.registry_helpers import wait_until_settled

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


@pytest.fixture
def sdk(server, admin):
    from openai import OpenAI

    _, token = server.service.auth.create_token("sdk-user", is_admin=True)
    return OpenAI(base_url=f"{server.url}/serving-endpoints", api_key=token, max_retries=0)


def external(admin, name: str, url: str, provider: str = "openai") -> None:
    if provider == "openai":
        config = {"openai_config": {"openai_api_key": "{{secrets/my_scope/my_openai_api_key}}", "openai_api_base": url}}
    else:
        config = {"anthropic_config": {"anthropic_api_key": "{{secrets/my_scope/my_openai_api_key}}"}}
    admin.post("/api/2.0/serving-endpoints", json={"name": name, "config": {"served_entities": [{"external_model": {
        "name": "m", "provider": provider, "task": "llm/v1/chat", **config}}]}}).raise_for_status()
    wait_until_settled(admin, name)


def test_max_completion_tokens_is_max_tokens(sdk):
    answer = sdk.chat.completions.create(model="system-echo", messages=[{"role": "user", "content": "one two three four"}],
                                         max_completion_tokens=2)
    assert answer.choices[0].message.content == "one two" and answer.choices[0].finish_reason == "length"
    import openai

    with pytest.raises(openai.BadRequestError, match="max_tokens = 3 and max_completion_tokens = 2 disagree"):
        sdk.chat.completions.create(model="system-echo", messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                    max_completion_tokens=2)


def test_current_fields_are_accepted_or_refused_by_name(server, admin):
    ask = {"model": "system-echo", "messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]}
    accepted = admin.post("/serving-endpoints/chat/completions",
                          json=ask | {"metadata": {"team": "a"}, "store": False, "user": "u", "frequency_penalty": 0.5,
                                      "presence_penalty": 0.1, "parallel_tool_calls": True})
    assert accepted.status_code == 200, accepted.text
    refused = admin.post("/serving-endpoints/chat/completions", json=ask | {"reasoning_effort": "low", "store": True})
    assert refused.status_code == 501
    error = refused.json()["error"]
    assert error["code"] == "NOT_IMPLEMENTED" and "reasoning_effort (no served model reasons; leave it out)" in error["message"]
    assert "store: true" in error["message"]
    unknown = admin.post("/serving-endpoints/chat/completions", json=ask | {"colour": 1})
    assert unknown.status_code == 400 and "colour: unknown field 'colour'" in unknown.json()["error"]["message"]


def test_tools_round_trip_through_an_openai_protocol_provider(sdk, admin, upstream):
    external(admin, "tooly", upstream.url)
    asked = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = sdk.chat.completions.create(model="tooly", messages=asked, tools=[WEATHER], tool_choice="auto")
    [call] = first.choices[0].message.tool_calls
    assert first.choices[0].finish_reason == "tool_calls" and first.choices[0].message.content is None
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    sent = upstream.calls[-1][1]
    assert sent["tools"] == [WEATHER] and sent["tool_choice"] == "auto"  # passed through as sent
    followed = asked + [first.choices[0].message.model_dump(exclude_none=True),
                        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    second = sdk.chat.completions.create(model="tooly", messages=followed, tools=[WEATHER])
    assert second.choices[0].message.content == "the tool said: sunny, 21 C"
    assert upstream.calls[-1][1]["messages"][-1] == {"role": "tool", "content": "sunny, 21 C", "tool_call_id": call.id}
    streamed = list(sdk.chat.completions.create(model="tooly", messages=asked, tools=[WEATHER], stream=True))
    pieces = [c.choices[0].delta.tool_calls for c in streamed if c.choices and c.choices[0].delta.tool_calls]
    assert pieces and pieces[0][0].index == 0 and pieces[0][0].function.name == "get_weather"
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "tool_calls"


def test_tools_are_mapped_to_anthropics_messages_api(sdk, admin, upstream, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_BASE_URL", upstream.url.removesuffix("/v1"))
    external(admin, "claude", upstream.url, provider="anthropic")
    asked = [{"role": "user", "content": "What is the weather in Oslo?"}]
    first = sdk.chat.completions.create(model="claude", messages=asked, tools=[WEATHER],
                                        tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                        parallel_tool_calls=False)
    [call] = first.choices[0].message.tool_calls
    assert call.id == "toolu_1" and json.loads(call.function.arguments) == {"city": "Oslo"}
    sent = upstream.calls[-1][1]
    assert sent["tools"] == [{"name": "get_weather", "description": "Current weather of a city",
                              "input_schema": WEATHER["function"]["parameters"]}]
    assert sent["tool_choice"] == {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
    followed = asked + [first.choices[0].message.model_dump(exclude_none=True),
                        {"role": "tool", "tool_call_id": "toolu_1", "content": "snow"}]
    second = sdk.chat.completions.create(model="claude", messages=followed, tools=[WEATHER])
    assert second.choices[0].message.content == "the tool said: snow"
    turns = upstream.calls[-1][1]["messages"]
    assert turns[1] == {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                           "input": {"city": "Oslo"}}]}
    assert turns[2] == {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "snow"}]}


def test_models_lists_what_the_caller_may_query(server, admin, sdk, upstream):
    external(admin, "private", upstream.url)
    assert {"system-smollm2-135m-instruct", "private"} <= {m.id for m in sdk.models.list()}
    assert sdk.models.retrieve("private").id == "private"
    with server.client(server.service.auth.create_token("nobody")[1]) as nobody:
        listed = {m["id"] for m in nobody.get("/serving-endpoints/models").json()["data"]}
        assert "system-smollm2-135m-instruct" in listed and "private" not in listed
        assert nobody.get("/serving-endpoints/models/private").status_code == 404


def test_the_responses_api_answers_with_the_chat_path(sdk, admin, upstream):
    answer = sdk.responses.create(model="system-echo", input="hello there", instructions="be kind", max_output_tokens=16)
    assert answer.output_text == "hello there" and answer.status == "completed"
    assert answer.usage.output_tokens == 2
    with sdk.responses.stream(model="system-echo", input=[{"role": "user", "content": "streamed words"}]) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "streamed words" == final.output_text
    external(admin, "tooly", upstream.url)
    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"]}]
    called = sdk.responses.create(model="tooly", input="weather in Rome?", tools=tools)
    [item] = [o for o in called.output if o.type == "function_call"]
    assert item.name == "get_weather" and json.loads(item.arguments) == {"city": "Rome"}
    import openai

    with pytest.raises(openai.APIStatusError, match="previous_response_id") as refused:
        sdk.responses.create(model="system-echo", input="x", previous_response_id="resp_1")
    assert refused.value.status_code == 501


def test_a_stream_keeps_the_answer_when_the_upstream_does_not_stream(sdk, admin, upstream):
    external(admin, "plain", upstream.url)
    upstream.ignore_stream = True  # this upstream answers stream=true with one JSON object
    chunks = list(sdk.chat.completions.create(model="plain", messages=[{"role": "user", "content": "all of it"}], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "all of it"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert upstream.calls[-1][1]["stream"] is True


def test_every_chunk_stream_ends_with_usage_for_clients_that_do_not_ask(server, admin):
    with httpx.stream("POST", f"{server.url}/serving-endpoints/chat/completions", headers=admin.headers,
                      json={"model": "system-echo", "messages": [{"role": "user", "content": "a b"}], "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] == "stop" and events[-1]["usage"]["completion_tokens"] == 2


@pytest.mark.engine
def test_the_local_engine_calls_a_named_tool_with_valid_arguments(sdk, chat_engine):
    answer = sdk.chat.completions.create(
        model="system-smollm2-135m-instruct", messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=40, temperature=0)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)


def test_malformed_tool_fields_are_the_callers_mistake(admin):
    ask = {"model": "system-echo", "messages": [{"role": "user", "content": "x"}]}
    bad_tool = admin.post("/serving-endpoints/chat/completions", json=ask | {"tools": [{"type": "function"}]})
    assert bad_tool.status_code == 400 and "tools[0] must be" in bad_tool.json()["error"]["message"]
    bad_arguments = admin.post("/serving-endpoints/chat/completions", json=ask | {"messages": [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
                                                               "function": {"name": "f", "arguments": "{not json"}}]},
        {"role": "user", "content": "x"}]})
    assert bad_arguments.status_code == 400 and "arguments are a JSON object as text" in bad_arguments.json()["error"]["message"]
    bad_format = admin.post("/serving-endpoints/chat/completions",
                            json=ask | {"response_format": {"type": "json_schema", "json_schema": {"schema": "nope"}}})
    assert bad_format.status_code == 400 and "must be a JSON Schema object" in bad_format.json()["error"]["message"]
    too_much_context = admin.post("/serving-endpoints/chat/completions", json=ask | {"usage_context": {"k": "v" * 5000}})
    assert too_much_context.status_code == 400 and "usage_context is larger than 4096 bytes" in too_much_context.json()["error"]["message"]


def test_custom_model_params_are_part_of_an_answers_key():
    from serving.data.result_store import answer_keys

    rows = [{"x": 1}]
    assert answer_keys("iris", "v1", "predict", None, rows) == answer_keys("iris", "v1", "predict", None, rows, None)
    assert answer_keys("iris", "v1", "predict", None, rows, {"threshold": 0.5}) != answer_keys("iris", "v1", "predict", None, rows)


def test_the_responses_api_refuses_an_endpoint_that_is_not_a_chat_by_name(admin):
    answer = admin.post("/serving-endpoints/responses", json={"model": "system-all-minilm-l6-v2", "input": "hi"})
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == ("endpoint 'system-all-minilm-l6-v2' serves llm/v1/embeddings; this "
                                                "route is for llm/v1/chat")
