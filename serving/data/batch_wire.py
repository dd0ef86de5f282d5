"""The batch protocol between Spark executors (or any remote SQL engine) and ``sqlinfer serve``.

``POST /api/2.0/sqlinfer/batch`` carries a *whole* batch — every distinct request of a
partition chunk — in one compact JSON body, and answers one result per request, in order:

    {"endpoint": "e", "kind": "chat" | "complete" | "embed" | "predict",
     "requests": [...], "options": {...SamplingOptions...}}
    -> {"results": [{"text": ..., "finish_reason": ..., "prompt_tokens": ..., "error": ...}, ...]}

With ``"stream": true`` the answer is NDJSON instead, one line per result *as it completes*
(``{"index": i, "result": {...}}``, in completion order), then ``{"done": true}``, or an
``{"error": {"error_code", "message", "http_status"}}`` line if the batch fails as a whole. The
client commits each answer the moment its line arrives, and the server stops starting new
requests when the client goes away, so a killed job loses at most the requests in flight. A
result the server answered from its own result store says ``"from_store": true`` (not paid).

It is a sqlinfer extension (Databricks has no batch route). One request per batch, never per
row, is what lets many executors share one engine's continuous batch, one set of rate limits
and one usage log. Both ends use these functions, so the encoding lives in one place.
"""

from __future__ import annotations

from typing import Any

from engine.types import Choice, EmbeddingResult, GenerationResult, PredictionResult

KINDS = ("chat", "complete", "embed", "predict")


def encode_result(result: Any) -> dict[str, Any]:
    common = {"prompt_tokens": result.prompt_tokens, "error": result.error, "served_entity": result.served_entity,
              "error_status": result.error_status}
    if result.from_store:
        common["from_store"] = True
    if isinstance(result, GenerationResult):
        return common | {"choices": [[c.text, c.finish_reason] for c in result.choices],
                         "completion_tokens": result.completion_tokens}
    if isinstance(result, EmbeddingResult):
        return common | {"vector": result.vector}
    return common | {"value": result.value}


def decode_result(kind: str, data: dict[str, Any]) -> Any:
    common = {"prompt_tokens": data.get("prompt_tokens") or 0, "error": data.get("error"),
              "served_entity": data.get("served_entity"), "error_status": data.get("error_status"),
              "from_store": bool(data.get("from_store"))}
    if kind in ("chat", "complete"):
        return GenerationResult(choices=tuple(Choice(text=t, finish_reason=f) for t, f in data.get("choices") or ()),
                                completion_tokens=data.get("completion_tokens") or 0, **common)
    if kind == "embed":
        return EmbeddingResult(vector=data.get("vector") or [], **common)
    return PredictionResult(value=data.get("value"), **common)
