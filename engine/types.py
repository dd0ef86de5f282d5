"""Requests and results that cross the engine boundary.

These are the vocabulary shared by the engine, the serving layer's backends and the SQL
functions: sampling options validated once (pydantic, unknown fields rejected by name), and
plain result records with the text or vector, the finish reason and token usage. They import
nothing heavy so that ``ai_functions`` on a Spark executor can use them without vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# "custom": an MLflow pyfunc model (e.g. scikit-learn) answering ``{"predictions": ...}``.
Task = Literal["llm/v1/chat", "llm/v1/completions", "llm/v1/embeddings", "custom"]
TASKS: tuple[str, ...] = ("llm/v1/chat", "llm/v1/completions", "llm/v1/embeddings", "custom")
CUSTOM_TASK = "custom"
LLM_TASKS: tuple[str, ...] = TASKS[:3]
MAX_TOKENS_LIMIT = 1_000_000
MAX_CHOICES = 1_000
MAX_CHOICE_CHARS = 200


class SamplingOptions(BaseModel):
    """Generation parameters, with OpenAI's names and meanings.

    ``None`` means "the model's default". ``json_schema`` asks for structured output that
    conforms to the schema (vLLM structured outputs for local models).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # No model answers a million tokens; a larger value is a mistake, refused by name, not forwarded.
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: tuple[str, ...] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=16)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    json_schema: dict[str, Any] | None = None
    # The answer is exactly one of these strings (the task functions' fixed label sets): vLLM
    # decodes only these on the local engine; OpenAI-style providers get an enum JSON schema.
    choice: tuple[str, ...] | None = Field(default=None, min_length=1)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (as text, as OpenAI sends it) -> bias in [-100, 100]
    # OpenAI function tools ({"type": "function", "function": {name, description, parameters}}),
    # tool_choice ("auto" | "none" | "required" | {"type": "function", "function": {"name": ...}}).
    tools: tuple[dict[str, Any], ...] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("tools", mode="before")
    @classmethod
    def _tools_as_tuple(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    @field_validator("choice", mode="before")
    @classmethod
    def _choice_as_tuple(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    @field_validator("choice")
    @classmethod
    def _choice_is_a_small_set(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        # Each choice becomes part of a grammar the engine compiles: bounded, non-empty, distinct.
        if value is None:
            return value
        if len(value) > MAX_CHOICES or any(not 0 < len(c) <= MAX_CHOICE_CHARS for c in value) or len(set(value)) != len(value):
            raise ValueError(f"choice must be 1 to {MAX_CHOICES} distinct non-empty strings of at most "
                             f"{MAX_CHOICE_CHARS} characters")
        return value

    @model_validator(mode="after")
    def _one_kind_of_structured_output(self) -> "SamplingOptions":
        if self.choice is not None and self.json_schema is not None:
            raise ValueError("give choice or json_schema, not both")
        return self

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_tuple(cls, value: Any) -> Any:
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list):
            return tuple(value)
        return value

    def merged_over(self, defaults: "SamplingOptions") -> "SamplingOptions":
        """These options, with every unset field taken from ``defaults``."""
        return defaults.model_copy(update=self.model_dump(exclude_unset=True))


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top_logprobs: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class ToolCall:
    """A function call the model asked for: OpenAI's ``{id, type: function, function: {name, arguments}}``."""

    id: str
    name: str
    arguments: str  # JSON text, as OpenAI carries it

    def openai(self, index: int | None = None) -> dict[str, Any]:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


@dataclass(frozen=True)
class Choice:
    text: str
    finish_reason: str | None
    logprobs: tuple[TokenLogprob, ...] | None = None
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class GenerationResult:
    """One request's answer: ``n`` choices and its token usage, or an error for this row only."""

    choices: tuple[Choice, ...] = ()
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    served_entity: str | None = None  # set by the serving layer: which entity answered
    error_status: int | None = None  # HTTP-like status of a failure (429, 5xx: worth a fallback)
    cached_tokens: int = 0  # prompt tokens the engine took from its prefix cache instead of computing
    from_store: bool = False  # answered from a result store: nothing was sent or paid for it
    error_code: str | None = None  # the failure's error class when it is not implied by its status (GUARDRAIL_BLOCKED)
    guardrail: str | None = None  # what an AI Gateway guardrail did to this row (usage), e.g. "input.pii MASK (email)"

    @property
    def text(self) -> str | None:
        return self.choices[0].text if self.choices else None


@dataclass(frozen=True)
class EmbeddingResult:
    vector: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    error: str | None = None
    served_entity: str | None = None
    error_status: int | None = None
    from_store: bool = False
    error_code: str | None = None  # as GenerationResult's
    guardrail: str | None = None  # as GenerationResult's


@dataclass(frozen=True)
class PredictionResult:
    """A custom model's answer for one input row (any JSON value), or an error for this row."""

    value: Any = None
    error: str | None = None
    served_entity: str | None = None
    error_status: int | None = None
    prompt_tokens: int = 0  # custom models use no tokens; kept so usage and limits treat all rows alike
    completion_tokens: int = 0
    from_store: bool = False


@dataclass(frozen=True)
class StreamDelta:
    """A piece of one streamed answer: new text, and the usage counted so far.

    The last piece carries ``finish_reason``; its token counts are the request's totals.
    """

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    served_entity: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()  # whole calls (sqlinfer streams a tool call as one piece)
    guardrail: str | None = None  # what an AI Gateway guardrail did to the request (usage), as GenerationResult's
