"""A real HTTP server on 127.0.0.1 speaking the OpenAI (and Anthropic Messages) wire protocol, with scripted faults.

It stands in for providers outside this machine. Chat answers echo the last user message;
completions echo the prompt (a chat asked for one of a ``choice`` enum answers
``{"answer": <what follows "Text: ", or the first line>}``, so a test scripts the label, or one outside the set;
``stream=true`` chat answers come as SSE, a word per chunk, unless
``ignore_stream`` makes it answer plain JSON as some servers do); embeddings are 3 numbers per text.
Tools: offered tools and a user message that says "weather in <city>" get a call of the first
tool with ``{"city": <city>}`` (OpenAI ``tool_calls``, Anthropic ``tool_use``); a conversation that
ends with a tool result gets "the tool said: <result>". ``faults`` is a queue consumed
one per request: ``("status", 429, {"Retry-After": "1"})``, ``("status", 500)``,
``("status", 400)``, ``("slow", seconds)``, ``("drop",)`` (close without answering).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ScriptedOpenAIServer:
    def __init__(self):
        self.faults: deque = deque()
        self.latency = 0.0  # seconds every answer takes (a slow provider)
        self.ignore_stream = False  # answer stream=true with plain JSON (a server without SSE)
        self.calls: list[tuple[str, dict, str | None]] = []  # (path, body, Authorization)
        self.agents: list[str | None] = []  # each request's User-Agent (which HTTP client sent it)
        self.arrivals: list[float] = []  # each request's time.monotonic() on arrival
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with owner.lock:
                    owner.calls.append((self.path, body, self.headers.get("Authorization") or self.headers.get("x-api-key")))
                    owner.agents.append(self.headers.get("User-Agent"))
                    owner.arrivals.append(time.monotonic())
                    fault = owner.faults.popleft() if owner.faults else None
                if owner.latency:
                    time.sleep(owner.latency)
                if fault and fault[0] == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault and fault[0] == "slow":
                    time.sleep(fault[1])
                if fault and fault[0] == "status":
                    headers = fault[2] if len(fault) > 2 else {}
                    # A careless provider echoes the key it was sent: the backend must scrub it.
                    message = f"scripted failure {fault[1]} for key {self.headers.get('Authorization', '').removeprefix('Bearer ')}"
                    return self._send(fault[1], {"error": {"message": message, "type": "scripted"}}, headers)
                if body.get("stream") and self.path.endswith("/chat/completions") and not owner.ignore_stream:
                    return self._send_stream(owner.answer(self.path, body))
                self._send(200, owner.answer(self.path, body))

            def _send_stream(self, answer):
                """OpenAI's SSE: one chunk per word, a finish chunk, a usage chunk, [DONE]."""
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                shell = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": answer["model"]}
                words = answer["choices"][0]["message"]["content"].split(" ")
                chunks = [shell | {"choices": [{"index": 0, "delta": {"content": (" " if i else "") + w}, "finish_reason": None}]}
                          for i, w in enumerate(words)]
                chunks.append(shell | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                chunks.append(shell | {"choices": [], "usage": answer["usage"]})
                for chunk in chunks:
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
                self.close_connection = True

            def _send(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def answer(path: str, body: dict) -> dict:
        if path.endswith("/v1/messages"):  # the Anthropic Messages protocol
            last = body["messages"][-1]
            if isinstance(last["content"], list) and last["content"][0].get("type") == "tool_result":
                said = last["content"][0]["content"]
                return {"id": "msg_x", "type": "message", "role": "assistant", "model": body["model"],
                        "content": [{"type": "text", "text": f"the tool said: {said}"}], "stop_reason": "end_turn",
                        "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 2}}
            text = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
            city = _asked_city(text) if isinstance(text, str) else None
            if body.get("tools") and city:
                return {"id": "msg_x", "type": "message", "role": "assistant", "model": body["model"],
                        "content": [{"type": "tool_use", "id": "toolu_1", "name": body["tools"][0]["name"],
                                     "input": {"city": city}}],
                        "stop_reason": "tool_use", "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 2}}
            return {"id": "msg_x", "type": "message", "role": "assistant", "model": body["model"],
                    "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
                    "usage": {"input_tokens": 3, "output_tokens": 2}}
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        if path.endswith("/chat/completions"):
            last = body["messages"][-1]
            if last["role"] == "tool":
                message = {"role": "assistant", "content": f"the tool said: {last['content']}"}
                return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"], "usage": usage,
                        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
            text = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
            city = _asked_city(text)
            if body.get("tools") and city and body.get("tool_choice") != "none":
                call = {"id": "call_1", "type": "function",
                        "function": {"name": body["tools"][0]["function"]["name"], "arguments": json.dumps({"city": city})}}
                return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"], "usage": usage,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                                     "finish_reason": "tool_calls"}]}
            if ((body.get("response_format") or {}).get("json_schema") or {}).get("name") == "choice":
                # the label is what follows "Text: ", or the first line (ai_filter's statement)
                said = text.rsplit("Text: ", 1)[-1] if "Text: " in text else text.split("\n", 1)[0]
                text = json.dumps({"answer": said.strip()})
            return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"], "usage": usage,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}
        if path.endswith("/completions"):
            return {"id": "x", "object": "text_completion", "created": 0, "model": body["model"], "usage": usage,
                    "choices": [{"index": 0, "text": body["prompt"], "finish_reason": "stop"}]}
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        return {"object": "list", "model": body["model"], "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
                "data": [{"object": "embedding", "index": i, "embedding": [float(len(t)), 1.0, 0.0]} for i, t in enumerate(inputs)]}

    def stop(self) -> None:
        self.server.shutdown()


def _asked_city(text: str) -> str | None:
    marker = "weather in "
    if marker not in text:
        return None
    return text.split(marker, 1)[1].split()[0].strip("?.!,")
