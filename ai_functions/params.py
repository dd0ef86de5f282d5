"""``modelParameters`` -> validated :class:`SamplingOptions`, once per distinct value.

The connectors hand model parameters over as JSON text (DuckDB ``to_json`` of a STRUCT, Spark
``to_json`` of a ``named_struct``); parsing is cached so a 2048-row chunk validates them once.

Defaults for SQL (decided here, documented in the README): ``temperature`` 0 so a query is
reproducible (and its rows cacheable), ``max_tokens`` 256 so a forgotten limit cannot run away.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from pydantic import ValidationError

from ai_functions.errors import InvalidModelParameters
from engine.types import SamplingOptions

SQL_DEFAULTS = SamplingOptions(temperature=0.0, max_tokens=256)

# Parameters whose values the function owns; setting them in modelParameters is refused.
RESERVED = {"messages": "the request argument", "prompt": "the request argument", "model": "the endpoint argument",
            "stream": "ai_query (results are never streamed)", "json_schema": "responseFormat",
            "choice": "the task functions (ai_classify's labels)",
            # A SQL cell holds one answer: more choices or token logprobs would be paid for and dropped.
            "n": "ai_query (one answer per row)", "logprobs": "ai_query (a cell holds the answer text only)",
            "tools": "the chat routes (a SQL cell holds text, not tool calls)", "tool_choice": "the chat routes",
            "parallel_tool_calls": "the chat routes"}
SUPPORTED = tuple(name for name in SamplingOptions.model_fields if name not in RESERVED)


@lru_cache(maxsize=256)
def parse_model_parameters(text: str | None) -> SamplingOptions:
    if text is None or text in ("", "null"):
        return SQL_DEFAULTS
    try:
        raw: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidModelParameters(f"modelParameters is not valid JSON ({exc}): {text!r}") from None
    if not isinstance(raw, dict):
        raise InvalidModelParameters(
            f"modelParameters must be a struct of named values, e.g. named_struct('max_tokens', 64), got {text!r}"
        )
    values = {key: value for key, value in raw.items() if value is not None}
    for key in values:
        if key in RESERVED:
            raise InvalidModelParameters(f"modelParameters.{key} is reserved: it is set by {RESERVED[key]}")
        if key not in SUPPORTED:
            raise InvalidModelParameters(
                f"modelParameters.{key} is not a supported parameter; supported: {', '.join(SUPPORTED)}"
            )
    try:
        return SamplingOptions(**values).merged_over(SQL_DEFAULTS)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise InvalidModelParameters(
            f"modelParameters.{field} = {first.get('input')!r} is invalid: {first['msg']}"
        ) from None
