"""The task functions (``ai_classify``, ``ai_extract``, ``ai_summarize``, ``ai_translate``,
``ai_analyze_sentiment``, ``ai_fix_grammar``, ``ai_mask``, ``ai_gen``) and ``ai_filter``, as
prompts over ai_query.

Each call's constant arguments are checked once, before any row is sent, and compiled into a
:class:`TaskPlan`: the instruction every row's prompt starts with (the row's text comes last, so
the local engine's prefix cache computes the instruction once), what the model may answer, and
how an answer becomes the SQL value. Running a plan (``ai_functions.task_runner``) is ai_query
with that prompt, so batching, dedupe, the result store, limits, usage, explain and budgets are
the ones ai_query has.

Answers from a fixed set (classify, sentiment, filter) are constrained: ``choice`` on the local
engine (vLLM decodes nothing else), an enum JSON schema for OpenAI-style providers. A label
outside the set can then only come from a provider that ignores the schema; it is a per-row
error naming the label, never a silent NULL.

Decisions where Databricks' reference is silent or engine-specific (README, "Task functions"):
``ai_classify`` returns STRING (ARRAY<STRING> with ``multilabel``), not the newer form's VARIANT;
``ai_extract`` returns a STRUCT typed by its labels or schema; unsupported arguments are refused
with ``AI_FUNCTION_INVALID_ARGUMENT`` and the offending value.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

from ai_functions.errors import InvalidArgument, InvalidMaxWords
from ai_functions.spec import OutputSpec
from ai_functions.types import STRING, SqlType, from_json_schema, parse_type

# The functions of this module; ai_similarity (embeddings) and the aggregates live elsewhere.
TASK_FUNCTIONS = ("ai_classify", "ai_extract", "ai_summarize", "ai_translate", "ai_analyze_sentiment",
                  "ai_fix_grammar", "ai_mask", "ai_gen", "ai_filter")
SENTIMENTS = ("positive", "negative", "neutral", "mixed")
# Databricks' documented target languages: code -> name. Names are accepted too.
LANGUAGES = {"en": "English", "fr": "French", "de": "German", "hi": "Hindi", "it": "Italian",
             "pt": "Portuguese", "es": "Spanish", "th": "Thai"}
FILTER_ANSWERS = ("True", "False")
MAX_FILTER_VALUES = 5
MAX_DESCRIPTION_CHARS = 1_000  # per label description
MAX_INSTRUCTIONS_CHARS = 20_000  # ai_classify's options.instructions (Databricks' limit)
MAX_ARGUMENTS_CHARS = 256_000  # all of a call's constant arguments, as JSON
MAX_WORDS_LIMIT = 100_000
EXTRACT_MAX_CHARS = 100  # per extracted field (label form); about 30 tokens
BOOLEAN = SqlType("BOOLEAN")


@dataclass(frozen=True)
class TaskPlan:
    """One task-function call with its constant arguments validated."""

    function: str
    result: SqlType  # the SQL type of the function's value
    spec: OutputSpec  # what ai_query asks the model for (text, a choice, or a JSON schema)
    max_tokens: int
    instruction: str  # the fixed start of every prompt
    labels: tuple[str, ...] = ()  # the allowed answers, when they are a fixed set
    finish: Callable[[Any], Any] = field(default=lambda value: value, compare=False)

    @property
    def parameters(self) -> str:
        """The modelParameters ai_query sends (JSON text; temperature 0 as every SQL call)."""
        return json.dumps({"max_tokens": self.max_tokens})

    def prompt(self, values: list[Any]) -> str:
        """The prompt of one row (no value NULL)."""
        if self.function == "ai_gen":
            return str(values[0])
        if self.function == "ai_filter":
            return filter_statement(values) + self.instruction
        return self.instruction + str(values[0])


def _labels(value: Any, function: str, argument: str = "labels", minimum: int = 2, maximum: int = 20,
            described_maximum: int | None = None) -> tuple[tuple[str, ...], dict[str, str]]:
    """Labels as an ARRAY<STRING>, a JSON array text, or a map/JSON object of label -> description
    (``described_maximum`` labels at most in that form: ai_classify's newer form takes 500)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise InvalidArgument(f"{function}: {argument} {value[:80]!r} is not an ARRAY of labels nor JSON; write "
                                  f"ARRAY('bug', 'feature') or '{{\"bug\": \"a defect\", \"feature\": \"a request\"}}'") from None
    if isinstance(value, dict):
        descriptions = {str(k): "" if v is None else str(v) for k, v in value.items()}
        labels = tuple(descriptions)
        maximum = described_maximum or maximum
        long = next((k for k, v in descriptions.items() if len(v) > MAX_DESCRIPTION_CHARS), None)
        if long is not None:
            raise InvalidArgument(f"{function}: the description of label {long[:40]!r} has {len(descriptions[long])} "
                                  f"characters; at most {MAX_DESCRIPTION_CHARS}")
    elif isinstance(value, list):
        descriptions, labels = {}, tuple(value)
    else:
        raise InvalidArgument(f"{function}: {argument} must be an ARRAY<STRING> of labels or a map of label -> "
                              f"description, got {type(value).__name__} {value!r}")
    if any(not isinstance(label, str) or not label.strip() for label in labels):
        raise InvalidArgument(f"{function}: every label must be a non-empty STRING, got {list(labels)!r}")
    if len(set(labels)) != len(labels):
        raise InvalidArgument(f"{function}: labels must be distinct, got {list(labels)!r}")
    if not minimum <= len(labels) <= maximum:
        raise InvalidArgument(f"{function}: {argument} must hold {minimum} to {maximum} labels, got {len(labels)}: "
                              f"{list(labels)[:25]!r}")
    if any(len(label) > 100 for label in labels):
        raise InvalidArgument(f"{function}: a label may have at most 100 characters; shorten {next(l for l in labels if len(l) > 100)[:40]!r}...")
    return labels, descriptions


def _options(value: Any, function: str, allowed: dict[str, type]) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise InvalidArgument(f"{function}: options {value!r} is not a map; write MAP {{'multilabel': 'true'}} "
                                  f"or named_struct('multilabel', true)") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{function}: options must be a map of option -> value, got {value!r}")
    out = {}
    for name, given in value.items():
        if name not in allowed:
            raise InvalidArgument(f"{function}: unknown option {name!r}; options: {', '.join(allowed)}")
        if allowed[name] is bool:
            if isinstance(given, str) and given.lower() in ("true", "false"):
                given = given.lower() == "true"
            if not isinstance(given, bool):
                raise InvalidArgument(f"{function}: option {name} must be true or false, got {given!r}")
        elif given is not None and not isinstance(given, str):
            raise InvalidArgument(f"{function}: option {name} must be a STRING, got {given!r}")
        out[name] = given
    return out


def _in_set(labels: tuple[str, ...], function: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        value = value.strip() if isinstance(value, str) else value
        if value not in labels:
            raise ValueError(f"{function} answered {value!r}, which is not one of its labels {list(labels)!r}")
        return value
    return check


def _classify(arguments: dict[str, Any]) -> TaskPlan:
    labels, descriptions = _labels(arguments.get("labels"), "ai_classify", described_maximum=500)
    options = _options(arguments.get("options"), "ai_classify", {"multilabel": bool, "instructions": str, "version": str})
    if len(options.get("instructions") or "") > MAX_INSTRUCTIONS_CHARS:
        raise InvalidArgument(f"ai_classify: options.instructions has {len(options['instructions'])} characters; "
                              f"at most {MAX_INSTRUCTIONS_CHARS}")
    described = "".join(f"- {label}: {descriptions[label]}\n" for label in labels if descriptions.get(label))
    extra = f"{options['instructions'].strip()}\n" if options.get("instructions") else ""
    if options.get("multilabel"):
        # One yes/no per label: the answer's length is fixed by the labels, so a small model
        # cannot loop on a label, and every answer is a valid subset.
        instruction = (f"Which of these labels apply to the text: {', '.join(labels)}?\n{described}{extra}"
                       f"Answer with a JSON object saying true or false for each label.\n\nText: ")
        decided = SqlType("STRUCT", fields=tuple((label, BOOLEAN) for label in labels))

        def finish(value: Any) -> Any:
            return [label for label in labels if value.get(label)]
        return TaskPlan("ai_classify", SqlType("ARRAY", element=STRING), OutputSpec(decided, decided.json_schema(), False),
                        16 + sum(8 + len(label.encode()) // 2 for label in labels), instruction, labels=labels, finish=finish)
    # Wording picked on examples/data/reviews.csv (README, "Quality"): "one of: a, b" with "one
    # word" agreed with the stars on 177 of 193 reviews; "one of these labels ... the label only" on 112.
    answer = "Answer with one word." if all(" " not in label for label in labels) else "Answer with the label only."
    instruction = f"Classify the text as one of: {', '.join(labels)}. {answer}\n{described}{extra}\nText: "
    return _choice_plan("ai_classify", labels, instruction)


def _surface_forms(labels: tuple[str, ...]) -> tuple[str, ...]:
    """The strings the model may write for the labels: each as given and Capitalized (a small
    model writes "Positive" where the prompt says "positive"; held to lower case only, the bundled
    model, asked with the demo's prompt, agreed with the stars on 161 instead of 178 of 193 reviews)."""
    forms = dict.fromkeys(labels)
    for label in labels:
        forms.setdefault(label[:1].upper() + label[1:])
    return tuple(forms)


def _choice_plan(function: str, labels: tuple[str, ...], instruction: str) -> TaskPlan:
    forms = _surface_forms(labels)
    by_form = {label[:1].upper() + label[1:]: label for label in labels} | {label: label for label in labels}
    spec = OutputSpec(STRING, None, False, choice=forms)
    longest = max(len(label.encode()) for label in labels)  # bytes: a non-Latin character can be a token or more
    check = _in_set(forms, function)
    return TaskPlan(function, STRING, spec, max(8, longest // 2 + 4), instruction, labels=labels,
                    finish=lambda value: by_form[check(value)])


def _extract(arguments: dict[str, Any]) -> TaskPlan:
    given = arguments.get("labels")
    bounded = False  # label fields are bounded (maxLength); a schema's fields are not, so they get more room
    if isinstance(given, str) and given.lstrip().upper().startswith("STRUCT"):
        result = parse_type(given, "ai_extract schema")
        schema = result.json_schema()
    elif isinstance(given, str) and given.lstrip().startswith("{"):
        try:
            schema = json.loads(given)
        except (ValueError, RecursionError) as exc:
            raise InvalidArgument(f"ai_extract: schema is not valid JSON ({type(exc).__name__}): {given[:80]!r}") from None
        result = from_json_schema(schema, "ai_extract schema")
        if result.kind != "STRUCT":
            raise InvalidArgument(f"ai_extract: schema must describe an object with properties, got {given!r}")
    else:
        labels, descriptions = _labels(given, "ai_extract", minimum=1)
        bounded = True
        result = SqlType("STRUCT", fields=tuple((label, STRING) for label in labels))
        # Nullable fields: an entity the text does not mention is NULL, not an invented value. A
        # bounded length: the bundled model otherwise copies the text into a field until
        # max_tokens cuts the JSON off.
        schema = {"type": "object", "properties": {label: {"type": ["string", "null"], "maxLength": EXTRACT_MAX_CHARS}
                                                   for label in labels},
                  "required": list(labels), "additionalProperties": False}
    names = ", ".join(name for name, _ in result.fields)
    instruction = (f"Extract these fields from the text: {names}. Answer with a JSON object with exactly these keys; "
                   f"use null for a field the text does not mention.\n\nText: ")
    budget = 32 + 48 * len(result.fields) if bounded else 64 + 96 * len(result.fields)
    return TaskPlan("ai_extract", result, OutputSpec(result, schema, False), budget, instruction)


def _max_words(value: Any) -> int:
    if value is None:
        return 50
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)) \
            or int(value) != value:
        raise InvalidMaxWords(f"The maximum number of words must be a non-negative integer, but got {value!r}.")
    if value < 0:
        raise InvalidMaxWords(f"The maximum number of words must be a non-negative integer, but got {int(value)}.")
    if value > MAX_WORDS_LIMIT:
        shown = str(int(value)) if value < 10**12 else f"{str(int(value))[:12]}... ({len(str(int(value)))} digits)"
        raise InvalidMaxWords(f"max_words = {shown} is more than sqlinfer's limit of {MAX_WORDS_LIMIT}; use 0 for no limit.")
    return int(value)


def _summarize(arguments: dict[str, Any]) -> TaskPlan:
    words = _max_words(arguments.get("max_words"))
    limit = f" in at most {words} words" if words else ""
    budget = min(1024, int(words * 1.6) + 16) if words else 512
    return TaskPlan("ai_summarize", STRING, OutputSpec(STRING, None, False), budget,
                    f"Summarize the following text{limit}. Answer with the summary only.\n\nText: ")


def language(value: Any) -> str:
    """``to_lang`` as the language's English name: a code ('es') or a name ('Spanish')."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgument(f"ai_translate: to_lang must be a language code or name such as 'es' or 'Spanish', got {value!r}")
    key = value.strip().lower().split("-")[0]
    if key in LANGUAGES:
        return LANGUAGES[key]
    names = {name.lower(): name for name in LANGUAGES.values()}
    if value.strip().lower() in names:
        return names[value.strip().lower()]
    raise InvalidArgument(f"ai_translate: to_lang {value!r} is not supported; use one of "
                          + ", ".join(f"{code} ({name})" for code, name in LANGUAGES.items()))


def _translate(arguments: dict[str, Any]) -> TaskPlan:
    target = language(arguments.get("to_lang"))
    return TaskPlan("ai_translate", STRING, OutputSpec(STRING, None, False), 512,
                    f"Translate the following text to {target}. Answer with the translation only.\n\nText: ")


def _mask(arguments: dict[str, Any]) -> TaskPlan:
    labels, _ = _labels(arguments.get("labels"), "ai_mask", minimum=1, maximum=50)
    return TaskPlan("ai_mask", STRING, OutputSpec(STRING, None, False), 512,
                    f"Rewrite the text with every {', '.join(labels)} replaced by [MASKED]. Keep everything else "
                    f"exactly as it is. Answer with the rewritten text only.\n\nText: ")


_PLACEHOLDER = re.compile(r"\{(\d+)\}")


def filter_statement(values: list[Any]) -> str:
    """``ai_filter``'s statement: a template with ``{0}``-style placeholders filled from the values
    after it (Snowflake's PROMPT), or an instruction followed by its inputs."""
    template, *inputs = (str(v) for v in values)
    used = sorted({int(n) for n in _PLACEHOLDER.findall(template)})
    if not used:
        return template + "".join(f"\nInput {i + 1}: {value}" for i, value in enumerate(inputs))
    if used[-1] >= len(inputs):
        raise InvalidArgument(f"ai_filter: the template {template[:80]!r} uses {{{used[-1]}}} but only {len(inputs)} "
                              f"value(s) follow it; placeholders count from {{0}}")
    return _PLACEHOLDER.sub(lambda m: inputs[int(m.group(1))], template)


def _filter(arguments: dict[str, Any]) -> TaskPlan:
    spec = OutputSpec(STRING, None, False, choice=FILTER_ANSWERS)
    check = _in_set(FILTER_ANSWERS, "ai_filter")
    # The statement first, the question after it: the bundled 135M model judged 5 of 8 plain
    # statements right this way, and answered False to all 8 with the question first.
    return TaskPlan("ai_filter", BOOLEAN, spec, 4, "\n\nIs that true or false? Answer True or False.",
                    labels=FILTER_ANSWERS, finish=lambda value: check(value) == "True")


def _fixed(function: str, instruction: str, max_tokens: int) -> Callable[[dict[str, Any]], TaskPlan]:
    return lambda arguments: TaskPlan(function, STRING, OutputSpec(STRING, None, False), max_tokens, instruction)


_COMPILERS: dict[str, Callable[[dict[str, Any]], TaskPlan]] = {
    "ai_classify": _classify,
    "ai_extract": _extract,
    "ai_summarize": _summarize,
    "ai_translate": _translate,
    "ai_analyze_sentiment": lambda _: _choice_plan(
        "ai_analyze_sentiment", SENTIMENTS,
        # All four labels named, positive/negative first: 157 of 193 agreed with the stars; listing
        # the four evenly made the bundled model answer "mixed" for most reviews (27 of 193).
        "Classify the sentiment of this text as positive or negative. Answer with one word (mixed if it is both, "
        "neutral if neither).\n\nText: "),
    "ai_fix_grammar": _fixed("ai_fix_grammar", "Correct the grammar and spelling of the following text. Answer with the "
                             "corrected text only.\n\nText: ", 512),
    "ai_mask": _mask,
    "ai_gen": _fixed("ai_gen", "", 256),
    "ai_filter": _filter,
}

# The arguments each function takes after its value columns (names as in Databricks' reference).
ARGUMENTS = {"ai_classify": ("labels", "options"), "ai_extract": ("labels",), "ai_summarize": ("max_words",),
             "ai_translate": ("to_lang",), "ai_analyze_sentiment": (), "ai_fix_grammar": (), "ai_mask": ("labels",),
             "ai_gen": (), "ai_filter": ()}


@lru_cache(maxsize=256)
def _compiled(function: str, arguments_json: str) -> TaskPlan:
    return _COMPILERS[function](json.loads(arguments_json))


def compile_task(function: str, arguments: dict[str, Any] | str | None = None) -> TaskPlan:
    """The plan of ``function`` with these constant arguments; bad arguments raise here, before any call."""
    if function not in _COMPILERS:
        raise InvalidArgument(f"unknown AI function {function!r}; the task functions are {', '.join(TASK_FUNCTIONS)}")
    given = json.loads(arguments) if isinstance(arguments, str) else dict(arguments or {})
    unknown = sorted(set(given) - set(ARGUMENTS[function]))
    if unknown:
        raise InvalidArgument(f"{function} has no argument {unknown[0]!r}; its arguments: "
                              f"{', '.join(('content',) + ARGUMENTS[function]) or 'content'}")
    text = json.dumps(given, sort_keys=True)
    if len(text) > MAX_ARGUMENTS_CHARS:
        raise InvalidArgument(f"{function}: the arguments take {len(text)} characters as JSON; at most {MAX_ARGUMENTS_CHARS}")
    try:
        return _compiled(function, text)
    except (RecursionError, AttributeError, TypeError) as exc:  # a schema or type nested too deep, or of the wrong shape
        raise InvalidArgument(f"{function}: the arguments are not a schema or labels it can read ({type(exc).__name__}); "
                              f"give labels as ARRAY('a', 'b') or a schema as 'STRUCT<a: STRING>'") from None


def result_type(function: str, arguments: dict[str, Any] | str | None = None) -> SqlType:
    """The SQL type ``function`` returns, from only the arguments that decide it (ai_classify's
    options, ai_extract's labels), which a SQL engine knows while it binds the query."""
    given = json.loads(arguments) if isinstance(arguments, str) else dict(arguments or {})
    if function == "ai_classify":
        options = _options(given.get("options"), "ai_classify", {"multilabel": bool, "instructions": str, "version": str})
        return SqlType("ARRAY", element=STRING) if options.get("multilabel") else STRING
    if function == "ai_extract":
        return compile_task(function, {"labels": given.get("labels")}).result
    return compile_task(function, {} if function in ("ai_filter", "ai_analyze_sentiment", "ai_fix_grammar", "ai_gen")
                        else _PLACEHOLDER_ARGUMENTS[function]).result


# Arguments that stand in for the real ones when only the (fixed) result type is asked for.
_PLACEHOLDER_ARGUMENTS = {"ai_summarize": {}, "ai_translate": {"to_lang": "en"}, "ai_mask": {"labels": ["x"]}}
