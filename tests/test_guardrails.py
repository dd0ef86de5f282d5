"""AI Gateway guardrails, enforced: PII (BLOCK / MASK) and invalid keywords, on the way in and out.

Endpoints are external ``custom`` models on a scripted OpenAI-protocol server on 127.0.0.1
(tests/fake_providers.py), queried through a real sqlinfer REST server, so each test sees what the
provider received (a blocked request never arrives; a masked one arrives masked) and can script an
answer that carries PII.
"""

from __future__ import annotations

import json

import pytest

from serving.data.guardrails import Guard, find_pii, mask
from serving.data.usage import UsageRecorder
from tests.fake_providers import ScriptedOpenAIServer
from tests.registry_helpers import external_endpoint, sql_rows

EMAIL = "alice.smith@example.com"
PHONE = "+1 650-253-0000"
CARD = "4111 1111 1111 1111"  # Luhn-valid (Visa's test number)
NOT_A_CARD = "4111 1111 1111 1112"  # 16 digits, Luhn-invalid
PII = {"email": EMAIL, "phone": PHONE, "card": CARD}


def ask(text: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 8, **extra}


def guarded(server, admin, upstream, name: str, guardrails: dict, task: str = "llm/v1/chat", **gateway) -> None:
    body = external_endpoint(name, upstream.url)
    body["config"]["served_entities"][0]["external_model"]["task"] = task
    admin.post("/api/2.0/serving-endpoints", json=body).raise_for_status()
    server.service.wait_for_deployments()
    response = admin.put(f"/api/2.0/serving-endpoints/{name}/ai-gateway", json={"guardrails": guardrails, **gateway})
    assert response.status_code == 200, response.text


def answering(upstream: ScriptedOpenAIServer, text: str) -> None:
    """Script the provider to answer ``text`` to every chat or completion request."""
    def answer(path: str, body: dict) -> dict:
        reply = ScriptedOpenAIServer.answer(path, body)
        if path.endswith("/chat/completions"):
            reply["choices"][0]["message"]["content"] = text
        elif path.endswith("/completions"):
            reply["choices"][0]["text"] = text
        return reply

    upstream.answer = answer


def blocked(response, message: str) -> None:
    assert response.status_code == 400, response.text
    assert response.json() == {"error_code": "GUARDRAIL_BLOCKED", "message": message}


def usage(server, name: str) -> list[tuple[int, str | None]]:
    return [(r["status_code"], r["guardrail"]) for r in UsageRecorder(server.service.db).rows(name)]


# -- the detector on its own ---------------------------------------------------------------------

def test_the_detector_finds_each_kind_with_its_span():
    text = f"mail {EMAIL}, call {PHONE} or pay with {CARD}."
    found = [(f.kind, text[f.start:f.end]) for f in find_pii(text)]
    assert found == [("email", EMAIL), ("phone", PHONE), ("card", CARD)]
    assert mask(text, find_pii(text)) == "mail [EMAIL], call [PHONE] or pay with [CARD]."


@pytest.mark.parametrize("text", [NOT_A_CARD, "4111111111111112", "2024-05-01 2024-06-01", "version 3.11.2 on 10.0.0.1",
                                  "order 12345, room 42", "user@localhost", "1234 5678 9012 3456"])
def test_the_detector_leaves_look_alikes_alone(text):
    assert find_pii(text) == []


def test_cards_are_luhn_checked_and_written_like_cards():
    for text, card in [("4111111111111111", "4111111111111111"), ("amex 3782 822463 10005", "3782 822463 10005"),
                       ("ref 1234-4111-1111-1111-1111", "4111-1111-1111-1111"), ("4111 1111 1111 1111 12 27", CARD)]:
        assert [(f.kind, text[f.start:f.end]) for f in find_pii(text)] == [("card", card)], text


def test_phone_numbers_without_a_country_code_are_read_in_the_default_region():
    text = "call (650) 253-0000 today"
    assert [(f.kind, text[f.start:f.end]) for f in find_pii(text)] == [("phone", "(650) 253-0000")]


def test_invalid_keywords_match_whole_words_in_any_case():
    guard = Guard("input", {"invalid_keywords": ["Project Falcon"]})
    verdict = guard.check([("messages[0].content", "what is PROJECT FALCON?")])
    assert verdict.blocked == ("input guardrail blocked the request: the invalid keyword 'Project Falcon' is in "
                               "messages[0].content; remove it")
    assert verdict.action == "input.invalid_keywords BLOCK"
    assert guard.check([("messages[0].content", "project falconry and subproject falcon2")]).blocked is None


# -- input guardrails over REST --------------------------------------------------------------------

def test_input_block_refuses_each_kind_and_nothing_reaches_the_provider(server, admin, upstream):
    guarded(server, admin, upstream, "in-block", {"input": {"pii": {"behavior": "BLOCK"}}})
    for kind, value in PII.items():
        response = admin.post("/serving-endpoints/in-block/invocations", json=ask(f"reach me at {value} please"))
        blocked(response, f"input guardrail blocked the request: PII ({kind}) found in messages[0].content; "
                          f"remove it or ask the endpoint's manager to use MASK")
        assert value not in response.text
    assert upstream.calls == []
    # a Luhn-invalid 16-digit number is no card: it goes through unchanged
    fine = admin.post("/serving-endpoints/in-block/invocations", json=ask(f"invoice {NOT_A_CARD}"))
    assert fine.status_code == 200, fine.text
    assert fine.json()["choices"][0]["message"]["content"] == f"invoice {NOT_A_CARD}"
    assert [call[1]["messages"] for call in upstream.calls] == [[{"role": "user", "content": f"invoice {NOT_A_CARD}"}]]
    assert usage(server, "in-block") == [(400, "input.pii BLOCK (email)"), (400, "input.pii BLOCK (phone)"),
                                         (400, "input.pii BLOCK (card)"), (200, None)]
    rows = UsageRecorder(server.service.db).rows("in-block")
    assert not any(value in (row["error"] or "") for row in rows for value in PII.values())


def test_the_openai_route_answers_a_block_in_openais_error_shape(server, admin, upstream):
    guarded(server, admin, upstream, "in-block-openai", {"input": {"pii": {"behavior": "BLOCK"}}})
    response = admin.post("/serving-endpoints/chat/completions", json={"model": "in-block-openai", **ask(f"card {CARD}")})
    assert response.status_code == 400
    assert response.json() == {"error": {
        "message": "input guardrail blocked the request: PII (card) found in messages[0].content; remove it or ask "
                   "the endpoint's manager to use MASK", "type": "guardrail_blocked", "code": "GUARDRAIL_BLOCKED"}}
    assert upstream.calls == []


def test_input_mask_sends_placeholders_and_keeps_the_payload_log_masked(server, admin, upstream):
    guarded(server, admin, upstream, "in-mask", {"input": {"pii": {"behavior": "MASK"}}},
            inference_table_config={"enabled": True})
    body = {"messages": [{"role": "system", "content": f"the user's e-mail is {EMAIL}"},
                         {"role": "user", "content": f"call {PHONE}, card {CARD}, not {NOT_A_CARD}"}]}
    response = admin.post("/serving-endpoints/in-mask/invocations", json=body)
    assert response.status_code == 200, response.text
    sent = [{"role": "system", "content": "the user's e-mail is [EMAIL]"},
            {"role": "user", "content": f"call [PHONE], card [CARD], not {NOT_A_CARD}"}]
    assert [call[1]["messages"] for call in upstream.calls] == [sent]
    assert response.json()["choices"][0]["message"]["content"] == f"call [PHONE], card [CARD], not {NOT_A_CARD}"
    assert usage(server, "in-mask") == [(200, "input.pii MASK (email, phone, card)")]
    [payload] = server.service.db.read().execute("SELECT request_json, response_json FROM inference_payloads").fetchall()
    assert json.loads(payload["request_json"]) == sent
    assert json.loads(payload["response_json"])["choices"] == [f"call [PHONE], card [CARD], not {NOT_A_CARD}"]


def test_invalid_keywords_block_requests_and_answers(server, admin, upstream):
    guarded(server, admin, upstream, "keywords", {"input": {"invalid_keywords": ["Project Falcon"]},
                                                  "output": {"invalid_keywords": ["classified"]}})
    blocked(admin.post("/serving-endpoints/keywords/invocations", json=ask("status of project falcon?")),
            "input guardrail blocked the request: the invalid keyword 'Project Falcon' is in messages[0].content; "
            "remove it")
    assert upstream.calls == []
    answering(upstream, "That is CLASSIFIED.")
    blocked(admin.post("/serving-endpoints/keywords/invocations", json=ask("status of falconry?")),
            "output guardrail blocked the answer: the invalid keyword 'classified' is in the answer; rephrase the request")
    assert len(upstream.calls) == 1
    assert usage(server, "keywords") == [(400, "input.invalid_keywords BLOCK"), (400, "output.invalid_keywords BLOCK")]


def test_embedding_inputs_are_guarded_row_by_row(server, admin, upstream):
    guarded(server, admin, upstream, "vectors", {"input": {"pii": {"behavior": "BLOCK"}}}, task="llm/v1/embeddings")
    response = admin.post("/serving-endpoints/vectors/invocations", json={"input": ["a plain sentence", f"mail {EMAIL}"]})
    blocked(response, "input guardrail blocked the request: PII (email) found in the input; remove it or ask the "
                      "endpoint's manager to use MASK")
    assert [call[1]["input"] for call in upstream.calls] == [["a plain sentence"]]  # the blocked text never left


# -- output guardrails -----------------------------------------------------------------------------

def test_output_block_replaces_the_answer_with_an_error(server, admin, upstream):
    guarded(server, admin, upstream, "out-block", {"output": {"pii": {"behavior": "BLOCK"}}})
    answering(upstream, f"Sure, her number is {PHONE}.")
    response = admin.post("/serving-endpoints/out-block/invocations", json=ask("what is her number?"))
    blocked(response, "output guardrail blocked the answer: PII (phone) found in the answer; rephrase the request or "
                      "ask the endpoint's manager to use MASK")
    assert PHONE not in response.text
    assert len(upstream.calls) == 1
    [row] = UsageRecorder(server.service.db).rows("out-block")
    assert (row["status_code"], row["guardrail"], row["output_tokens"]) == (400, "output.pii BLOCK (phone)", 2)


def test_output_mask_masks_the_answer(server, admin, upstream):
    guarded(server, admin, upstream, "out-mask", {"output": {"pii": {"behavior": "MASK"}}})
    answering(upstream, f"Write to {EMAIL} or call {PHONE}.")
    response = admin.post("/serving-endpoints/out-mask/invocations", json=ask(f"contact? (mine is {EMAIL})"))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Write to [EMAIL] or call [PHONE]."
    assert upstream.calls[0][1]["messages"][0]["content"] == f"contact? (mine is {EMAIL})"  # no input guardrail
    completion = admin.post("/serving-endpoints/completions", json={"model": "out-mask", "prompt": "contact:"})
    assert completion.json()["choices"][0]["text"] == "Write to [EMAIL] or call [PHONE]."
    assert usage(server, "out-mask") == [(200, "output.pii MASK (email, phone)")] * 2


# -- SQL batches ---------------------------------------------------------------------------------

def test_a_blocked_row_fails_alone_in_a_batch(server, admin, upstream):
    guarded(server, admin, upstream, "batched", {"input": {"pii": {"behavior": "BLOCK"}}})
    requests = [[{"role": "user", "content": "first"}], [{"role": "user", "content": f"card {CARD}"}],
                [{"role": "user", "content": "third"}]]
    response = admin.post("/api/2.0/sqlinfer/batch", json={"endpoint": "batched", "kind": "chat", "requests": requests})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [(r["choices"], r["error"], r["error_status"]) for r in results] == [
        ([["first", "stop"]], None, None),
        ([], "input guardrail blocked the request: PII (card) found in messages[0].content; remove it or ask the "
             "endpoint's manager to use MASK", 400),
        ([["third", "stop"]], None, None)]
    sent = sorted(call[1]["messages"][0]["content"] for call in upstream.calls)
    assert sent == ["first", "third"]
    assert sorted(usage(server, "batched"), key=str) == [(200, None), (200, None), (400, "input.pii BLOCK (card)")]


def test_ai_query_in_duckdb_reports_the_blocked_row(server, admin, upstream):
    guarded(server, admin, upstream, "sql-guarded", {"input": {"pii": {"behavior": "BLOCK"}}})
    rows = sql_rows(server.service, f"SELECT r, ai_query('sql-guarded', r, failOnError => false) AS a FROM "
                                    f"(VALUES ('hello'), ('mail {EMAIL}')) t(r) ORDER BY r")
    assert rows == [("hello", {"result": "hello", "errorMessage": None}),
                    (f"mail {EMAIL}", {"result": None, "errorMessage": "input guardrail blocked the request: PII (email) "
                                       "found in messages[0].content; remove it or ask the endpoint's manager to use MASK"})]
    assert [call[1]["messages"][0]["content"] for call in upstream.calls] == ["hello"]
    assert sorted(usage(server, "sql-guarded"), key=str) == [(200, None), (400, "input.pii BLOCK (email)")]


# -- streams -------------------------------------------------------------------------------------

def sse_events(response) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in response.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def test_a_stream_is_checked_before_it_starts(server, admin, upstream):
    guarded(server, admin, upstream, "stream-in", {"input": {"pii": {"behavior": "BLOCK"}}})
    response = admin.post("/serving-endpoints/stream-in/invocations", json=ask(f"my mail is {EMAIL}", stream=True))
    blocked(response, "input guardrail blocked the request: PII (email) found in messages[0].content; remove it or "
                      "ask the endpoint's manager to use MASK")
    assert upstream.calls == []
    assert usage(server, "stream-in") == [(400, "input.pii BLOCK (email)")]


def test_a_stream_with_output_guardrails_is_checked_whole_and_sent_as_one_piece(server, admin, upstream):
    guarded(server, admin, upstream, "stream-out", {"output": {"pii": {"behavior": "MASK"}}})
    answering(upstream, f"you can reach support at {EMAIL} any day")  # the provider streams it word by word
    response = admin.post("/serving-endpoints/stream-out/invocations", json=ask("support?", stream=True))
    assert response.status_code == 200, response.text
    contents = [e["choices"][0]["delta"]["content"] for e in sse_events(response) if e.get("choices")]
    assert contents == ["you can reach support at [EMAIL] any day"]
    assert upstream.calls[0][1]["stream"] is True
    assert usage(server, "stream-out") == [(200, "output.pii MASK (email)")]
    answering(upstream, f"call {PHONE}")
    guarded_block = admin.put("/api/2.0/serving-endpoints/stream-out/ai-gateway",
                              json={"guardrails": {"output": {"pii": {"behavior": "BLOCK"}}}})
    assert guarded_block.status_code == 200
    blocked(admin.post("/serving-endpoints/stream-out/invocations", json=ask("phone?", stream=True)),
            "output guardrail blocked the answer: PII (phone) found in the answer; rephrase the request or ask the "
            "endpoint's manager to use MASK")


# -- what stays refused ----------------------------------------------------------------------------

@pytest.mark.parametrize(("guardrails", "field", "why"), [
    ({"input": {"safety": True}}, "ai_gateway.guardrails.input.safety", "the safety filter needs a safety model"),
    ({"output": {"valid_topics": ["cooking"]}}, "ai_gateway.guardrails.output.valid_topics",
     "topic moderation needs a safety model"),
])
def test_safety_and_valid_topics_are_refused_by_name(server, admin, upstream, guardrails, field, why):
    admin.post("/api/2.0/serving-endpoints", json=external_endpoint("refusing", upstream.url)).raise_for_status()
    server.service.wait_for_deployments()
    with_pii = {**guardrails, "input": {**guardrails.get("input", {}), "pii": {"behavior": "MASK"}}}  # pii alone would pass
    response = admin.put("/api/2.0/serving-endpoints/refusing/ai-gateway", json={"guardrails": with_pii})
    assert response.status_code == 501, response.text
    assert response.json() == {"error_code": "NOT_IMPLEMENTED", "message":
                               f"not implemented by sqlinfer, refused rather than ignored: {field}: {why}, which sqlinfer "
                               f"does not have; remove it (pii and invalid_keywords are enforced)"}
    assert "ai_gateway" not in admin.get("/api/2.0/serving-endpoints/refusing").json()  # nothing was stored


# -- what else a request and an answer carry: parts, tool calls, tool definitions, sizes ---------

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def test_pii_split_across_content_parts_or_in_non_text_parts_is_blocked(server, admin, upstream):
    guarded(server, admin, upstream, "parts", {"input": {"pii": {"behavior": "MASK"}, "invalid_keywords": ["secret"]}})
    parts = [{"type": "text", "text": "write to alice.smith@"}, {"type": "text", "text": "example.com"}]
    # the chat routes join a message's text parts first: the address is found, and masked
    joined = admin.post("/serving-endpoints/parts/invocations", json={"messages": [{"role": "user", "content": parts}]})
    assert joined.status_code == 200 and joined.json()["choices"][0]["message"]["content"] == "write to [EMAIL]"
    assert upstream.calls[-1][1]["messages"] == [{"role": "user", "content": "write to [EMAIL]"}]
    # a SQL batch sends the parts as they are (providers join them): PII across parts cannot be masked, so it blocks
    batch = admin.post("/api/2.0/sqlinfer/batch", json={"endpoint": "parts", "kind": "chat", "requests": [
        [{"role": "user", "content": parts}], [{"role": "user", "content": [{"type": "text", "text": "the sec"},
                                                                             {"type": "text", "text": "ret plan"}]}]]})
    [split, keyword] = batch.json()["results"]
    assert split["error"] == ("input guardrail blocked the request: PII (email) spans the text parts of a message, where "
                              "it cannot be masked; send the text in one part, or remove it")
    assert keyword["error"].startswith("input guardrail blocked the request: an invalid keyword spans the text parts")
    upstream.calls.clear()
    image = admin.post("/api/2.0/sqlinfer/batch", json={"endpoint": "parts", "kind": "chat", "requests": [[
        {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}]]})
    assert image.json()["results"][0]["error"] == (
        "input guardrail blocked the request: messages[0].content has parts that are not text (images, audio or files "
        "cannot be checked); send text parts only")
    assert upstream.calls == []


def test_tool_call_arguments_are_guarded_both_ways_and_tool_definitions_on_the_way_in(server, admin, upstream):
    guarded(server, admin, upstream, "tools-out", {"input": {"pii": {"behavior": "BLOCK"}},
                                                   "output": {"pii": {"behavior": "MASK"}}})

    def answer(path: str, body: dict) -> dict:
        reply = ScriptedOpenAIServer.answer(path, body)
        call = {"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "notify": EMAIL})}}
        reply["choices"][0]["message"] = {"role": "assistant", "content": None, "tool_calls": [call]}
        reply["choices"][0]["finish_reason"] = "tool_calls"
        return reply

    upstream.answer = answer
    answered = admin.post("/serving-endpoints/tools-out/invocations", json={**ask("weather in Paris"), "tools": [WEATHER_TOOL]})
    assert answered.status_code == 200, answered.text
    [call] = answered.json()["choices"][0]["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "notify": "[EMAIL]"}
    assert EMAIL not in answered.text
    # an earlier call's arguments are part of the conversation sent on
    earlier = {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "get_weather", "arguments": json.dumps({"city": "Paris", "card": CARD})}}]}
    again = admin.post("/serving-endpoints/tools-out/invocations", json={"messages": [
        {"role": "user", "content": "weather?"}, earlier, {"role": "tool", "tool_call_id": "c", "content": "sunny"}],
        "tools": [WEATHER_TOOL]})
    blocked(again, "input guardrail blocked the request: PII (card) found in messages[1].tool_calls[0].function.arguments; "
                   "remove it or ask the endpoint's manager to use MASK")
    leaky_tool = {"type": "function", "function": {"name": "mail", "description": f"mails {EMAIL}", "parameters": {}}}
    refused = admin.post("/serving-endpoints/tools-out/invocations", json={**ask("hello"), "tools": [leaky_tool]})
    blocked(refused, "input guardrail blocked the request: the tools' definitions hold PII (email); remove it from the "
                     "tool descriptions")
    assert len(upstream.calls) == 1


def test_a_text_too_long_to_check_is_refused_not_sent(server, admin, upstream, monkeypatch):
    monkeypatch.setenv("SQLINFER_GUARDRAIL_MAX_CHARS", "1000")
    guarded(server, admin, upstream, "long", {"input": {"pii": {"behavior": "BLOCK"}}})
    response = admin.post("/serving-endpoints/long/invocations", json=ask("a" * 1001))
    blocked(response, "input guardrail blocked the request: its text is 1001 characters, more than the 1000 the "
                      "guardrails check (SQLINFER_GUARDRAIL_MAX_CHARS); send it in smaller pieces")
    assert upstream.calls == []


def test_long_runs_of_address_characters_do_not_hide_an_address():
    # a 64-character cap on the local part keeps the search linear; an address after such a run is still found
    text = "a!" * 50_000 + " mail " + EMAIL
    assert [(f.kind, text[f.start:f.end]) for f in find_pii(text)] == [("email", EMAIL)]


def test_guardrails_are_refused_where_they_cannot_act(server, admin, upstream):
    body = external_endpoint("vectors", upstream.url)
    body["config"]["served_entities"][0]["external_model"]["task"] = "llm/v1/embeddings"
    admin.post("/api/2.0/serving-endpoints", json=body).raise_for_status()
    server.service.wait_for_deployments()
    refused = admin.put("/api/2.0/serving-endpoints/vectors/ai-gateway",
                        json={"guardrails": {"output": {"pii": {"behavior": "MASK"}}}})
    assert refused.status_code == 400 and refused.json()["message"] == (
        "ai_gateway.guardrails.output: 'vectors' answers embeddings, which hold no text to check; keep the input "
        "guardrails only")
