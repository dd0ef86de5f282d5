"""AI Gateway guardrails: PII and invalid keywords, enforced on what goes to a model and what comes back.

An endpoint's ``ai_gateway.guardrails`` has ``input`` and ``output`` parameters. sqlinfer enforces
two of them (``safety`` and ``valid_topics`` need a safety model, which is not here, so they stay
refused by name with 501 ``NOT_IMPLEMENTED`` in ``serving.control.validation``):

* ``invalid_keywords``: a case-insensitive whole-word match of any listed keyword blocks the
  request (input) or the answer (output), as on Databricks.
* ``pii.behavior``: ``BLOCK`` refuses a request (or an answer) containing PII; ``MASK`` replaces
  each finding with a placeholder, ``[EMAIL]``, ``[PHONE]`` or ``[CARD]``, and goes on with the
  masked text; ``NONE`` (or no ``pii``) does nothing.

Why these detectors. PII here means e-mail addresses, phone numbers and payment card numbers;
each uses the maintained reference for its kind rather than a home-made pattern:

* phone numbers: ``phonenumbers`` (Google's libphonenumber), whose ``PhoneNumberMatcher`` finds
  numbers in free text and, at ``Leniency.VALID``, keeps only numbers that are valid for their
  country's numbering plan (so dates, versions and order numbers are not phones). Numbers written
  without ``+<country code>`` are read in ``SQLINFER_PII_PHONE_REGION`` (default ``US``).
* card numbers: runs of 13 to 19 digits, contiguous or in groups separated by single spaces or
  dashes the way cards are printed (groups of 4, or Amex' 4-6-5 / Diners' 4-6-4), whose Luhn
  checksum holds (``python-stdnum``'s ``stdnum.luhn``): ``4111 1111 1111 1111`` is a card,
  ``1234 5678 9012 3456`` is not.
* e-mail addresses: the WHATWG HTML "valid e-mail address" grammar (what browsers accept in
  ``<input type=email>``), adapted to find addresses inside text: the address starts at a letter,
  digit or ``_`` and its domain has at least one dot.

Presidio was considered: it finds more kinds, but its analyzer needs a spaCy language model that
is not on PyPI (it is downloaded from GitHub at run time), which this project cannot pin or install
with its ordinary clients; the two packages above are pure Python and pinned in pyproject.toml.

:class:`GuardedBackend` applies the guardrails around an endpoint's backend: input guardrails to
every chat message's text, completion prompt and embedding text *before* the inner backend is
called (a blocked row never reaches the model or provider; a masked row is sent masked), and
output guardrails to every answer's choice texts (BLOCK turns that row into a failed one, MASK
masks the text and drops its logprobs, which would spell the PII out token by token). In a batch
(SQL) a blocked row fails alone, with status 400 and ``GUARDRAIL_BLOCKED``; a single REST request
answers ``400 GUARDRAIL_BLOCKED``. A stream is checked before it starts; with output guardrails it
is buffered whole, checked, and sent as one piece (a guardrail cannot take back text already sent).

Messages and logs never contain the PII itself, only its kind and where it was found. The usage
table records what a guardrail did (``usage.guardrail``, e.g. ``input.pii MASK (email)``,
``output.pii BLOCK (phone)``, ``input.invalid_keywords BLOCK``), and the inference payload table
records requests with detected PII masked (``redact_request``), even under BLOCK.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from engine.types import EmbeddingResult, GenerationResult, StreamDelta
from serving.data.backends import Backend, DelegatingBackend, ResultCallback
from serving.errors import GuardrailBlocked, NotImplementedFeature

KINDS = ("email", "phone", "card")
PLACEHOLDERS = {"email": "[EMAIL]", "phone": "[PHONE]", "card": "[CARD]"}
PHONE_REGION = os.environ.get("SQLINFER_PII_PHONE_REGION", "US")


def max_checked_chars() -> int:
    """The most text one request or answer may carry through guardrails (checking is ~20 us a
    character with phone numbers in it; longer texts are refused, not sent unchecked)."""
    return int(os.environ.get("SQLINFER_GUARDRAIL_MAX_CHARS", "200000"))

# WHATWG HTML, "valid e-mail address": 1*( atext / "." ) "@" label *( "." label ), a label being
# up to 63 letters, digits and hyphens, not starting or ending with a hyphen. To find addresses in
# text: the local part starts at a letter, digit or "_", and the domain has at least one dot.
# The local part is capped at RFC 5321's 64 characters: uncapped, text like "a!a!a!..." made the
# search quadratic (26.8 s for 160 KB, holding the interpreter lock); capped it is linear.
_LOCAL = r"[a-zA-Z0-9_][a-zA-Z0-9.!#$%&'*+/=?^_`{|}~-]{0,63}"
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
_EMAIL = re.compile(rf"(?<![a-zA-Z0-9._%+-]){_LOCAL}@{_LABEL}(?:\.{_LABEL})+")
# Digits with single spaces or dashes between them: where card numbers are looked for.
_DIGIT_RUN = re.compile(r"[0-9](?:[ -]?[0-9])*")
_DIGIT = re.compile(r"\d")


@dataclass(frozen=True)
class Finding:
    """One piece of PII in a text: its kind (``email``, ``phone``, ``card``) and span."""

    kind: str
    start: int
    end: int


def find_pii(text: str, region: str | None = None) -> list[Finding]:
    """E-mail addresses, phone numbers and card numbers in ``text``, in text order, not overlapping."""
    found = _cards(text) + _emails(text)
    for phone in _phones(text, region or PHONE_REGION):
        if not any(phone.start < other.end and other.start < phone.end for other in found):
            found.append(phone)
    return sorted(found, key=lambda f: f.start)


def mask(text: str, findings: Sequence[Finding]) -> str:
    """``text`` with every finding replaced by its kind's placeholder."""
    for finding in sorted(findings, key=lambda f: f.start, reverse=True):
        text = text[:finding.start] + PLACEHOLDERS[finding.kind] + text[finding.end:]
    return text


def _emails(text: str) -> list[Finding]:
    if "@" not in text:
        return []
    return [Finding("email", m.start(), m.end()) for m in _EMAIL.finditer(text)]


def _cards(text: str) -> list[Finding]:
    """Card numbers: in every run of digit groups, the leftmost-longest windows of whole groups that
    are written like a card and pass the Luhn check ("1234-4111 1111 1111 1111" holds one)."""
    from stdnum import luhn

    found = []
    for match in _DIGIT_RUN.finditer(text):
        run = match.group(0)
        if sum(c.isdigit() for c in run) < 13:
            continue
        groups, separators = re.split(r"[ -]", run), re.findall(r"[ -]", run)
        offsets = [match.start()]
        for group, separator in zip(groups, separators):
            offsets.append(offsets[-1] + len(group) + len(separator))
        first = 0
        while first < len(groups):
            for last in range(min(len(groups), first + 19), first, -1):  # groups first .. last-1
                window = groups[first:last]
                digits = "".join(window)
                if (13 <= len(digits) <= 19 and len(set(separators[first:last - 1])) <= 1
                        and _card_grouping([len(g) for g in window]) and luhn.is_valid(digits)):
                    found.append(Finding("card", offsets[first], offsets[last - 1] + len(groups[last - 1])))
                    first = last
                    break
            else:
                first += 1
    return found


def _card_grouping(lengths: list[int]) -> bool:
    if len(lengths) == 1:
        return True
    if lengths in ([4, 6, 5], [4, 6, 4]):  # American Express, Diners Club
        return True
    return all(n == 4 for n in lengths[:-1]) and 1 <= lengths[-1] <= 4


def _phones(text: str, region: str) -> list[Finding]:
    if len(_DIGIT.findall(text)) < 7:  # no valid number, national or international, is shorter
        return []
    from phonenumbers import Leniency, PhoneNumberMatcher

    return [Finding("phone", m.start, m.end) for m in PhoneNumberMatcher(text, region, leniency=Leniency.VALID)]


# -- verdicts ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    """What one direction's guardrails decided about the texts of one request or answer.

    ``texts``: the texts to go on with, in order (masked under MASK; masked under BLOCK too, for the
    payload log only); ``blocked``: why it was refused, naming kinds and places but never the PII,
    or None; ``kinds``: the kinds of PII found; ``action``: what the usage table records, or None.
    """

    texts: tuple[str, ...]
    blocked: str | None = None
    kinds: tuple[str, ...] = ()
    action: str | None = None

    @property
    def text(self) -> str:
        return self.texts[0]


class Guard:
    """One direction's stored parameters (``guardrails.input`` or ``.output``), ready to check texts."""

    def __init__(self, direction: str, params: dict[str, Any] | None):
        params = params or {}
        self.direction = direction
        self.keywords = {k.casefold(): k for k in params.get("invalid_keywords") or [] if k.strip()}
        longest_first = sorted(self.keywords.values(), key=len, reverse=True)
        self._keywords = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, longest_first)) + r")(?!\w)",
                                    re.IGNORECASE) if self.keywords else None
        self.pii = (params.get("pii") or {}).get("behavior") or "NONE"

    @property
    def active(self) -> bool:
        return self._keywords is not None or self.pii in ("BLOCK", "MASK")

    def check(self, texts: Sequence[tuple[str, str]]) -> Verdict:
        """Check ``(where, text)`` pairs of one request (input) or one answer (output)."""
        originals = tuple(text for _, text in texts)
        subject = "request" if self.direction == "input" else "answer"
        size = sum(len(text) for _, text in texts)
        if size > max_checked_chars():  # fail closed: what is not checked is not sent
            return Verdict(originals, f"{self.direction} guardrail blocked the {subject}: its text is {size} characters, "
                                      f"more than the {max_checked_chars()} the guardrails check "
                                      f"(SQLINFER_GUARDRAIL_MAX_CHARS); send it in smaller pieces", (),
                           f"{self.direction} BLOCK (too long to check)")

        if self._keywords is not None:
            for where, text in texts:
                match = self._keywords.search(text)
                if match:
                    keyword = self.keywords.get(match.group(0).casefold(), match.group(0))
                    fix = "remove it" if self.direction == "input" else "rephrase the request"
                    return Verdict(originals, f"{self.direction} guardrail blocked the {subject}: the invalid keyword "
                                              f"{keyword!r} is in {where}; {fix}", (),
                                   f"{self.direction}.invalid_keywords BLOCK")
        if self.pii not in ("BLOCK", "MASK"):
            return Verdict(originals)
        masked, kinds, places = [], set(), []
        for where, text in texts:
            findings = find_pii(text)
            if findings:
                kinds.update(f.kind for f in findings)
                places.append(where)
            masked.append(mask(text, findings))
        if not kinds:
            return Verdict(originals)
        ordered = tuple(k for k in KINDS if k in kinds)
        action = f"{self.direction}.pii {self.pii} ({', '.join(ordered)})"
        if self.pii == "MASK":
            return Verdict(tuple(masked), None, ordered, action)
        fix = "remove it" if self.direction == "input" else "rephrase the request"
        return Verdict(tuple(masked), f"{self.direction} guardrail blocked the {subject}: PII ({', '.join(ordered)}) "
                                      f"found in {', '.join(places)}; {fix} or ask the endpoint's manager to use MASK",
                       ordered, action)

    def redact(self, texts: Sequence[str]) -> list[str]:
        """The texts with detected PII masked, whatever the behavior (BLOCK or MASK): for logs."""
        if self.pii not in ("BLOCK", "MASK"):
            return list(texts)
        return [mask(text, find_pii(text)) for text in texts]


def _joined(*actions: str | None) -> str | None:
    return "; ".join(a for a in actions if a) or None


# -- the texts of a request -----------------------------------------------------------------------

def _texts_of(request: Any, kind: str) -> list[tuple[str, str]]:
    """(where, text) of every text a request sends: chat message contents (text parts included, and
    their concatenation, which is what providers see), earlier tool calls' arguments, a prompt, an
    embedding input. Raises :class:`_NotText` for content that cannot be checked."""
    if kind != "chat":
        where = "the prompt" if kind == "complete" else "the input"
        if not isinstance(request, str):
            raise _NotText(f"{where} is not text (token ids or other values cannot be checked); send text")
        return [(where, request)]
    if not isinstance(request, (list, tuple)) or not all(isinstance(m, dict) for m in request):
        raise _NotText("the messages are not a list of {role, content} objects")
    texts = []
    for index, message in enumerate(request):
        content = message.get("content")
        if isinstance(content, str):
            texts.append((f"messages[{index}].content", content))
        elif isinstance(content, list):
            parts = [(f"messages[{index}].content[{p}].text", part["text"]) for p, part in enumerate(content)
                     if isinstance(part, dict) and isinstance(part.get("text"), str)]
            if len(parts) != len(content):
                raise _NotText(f"messages[{index}].content has parts that are not text (images, audio or files "
                               f"cannot be checked); send text parts only")
            texts += parts
        elif content is not None:
            raise _NotText(f"messages[{index}].content is not text; send a string or text parts")
        for call_index, call in enumerate(message.get("tool_calls") or []):
            arguments = (call.get("function") or {}).get("arguments") if isinstance(call, dict) else None
            if isinstance(arguments, str):
                texts.append((f"messages[{index}].tool_calls[{call_index}].function.arguments", arguments))
    return texts


def _joined_parts(request: Any) -> list[tuple[str, str]]:
    """Each multi-part message's parts joined: "alice@" + "example.com" is an address once joined."""
    joined = []
    for index, message in enumerate(request if isinstance(request, (list, tuple)) else []):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and len(content) > 1:
            joined.append((f"messages[{index}].content", "".join(p.get("text", "") for p in content if isinstance(p, dict))))
    return joined


class _NotText(Exception):
    """Content the guardrails cannot read: refused (fail closed), never sent unchecked."""


def _rebuilt(request: Any, kind: str, texts: Sequence[str]) -> Any:
    """``request`` with its texts (in :func:`_texts_of` order) replaced."""
    if kind != "chat":
        return texts[0] if isinstance(request, str) else request
    remaining = iter(texts)
    rebuilt = []
    for message in request:
        content = message.get("content")
        if isinstance(content, str):
            message = {**message, "content": next(remaining)}
        elif isinstance(content, list):
            message = {**message, "content": [{**part, "text": next(remaining)}
                                              if isinstance(part, dict) and isinstance(part.get("text"), str) else part
                                              for part in content]}
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                arguments = (call.get("function") or {}).get("arguments") if isinstance(call, dict) else None
                if isinstance(arguments, str):
                    call = {**call, "function": {**call["function"], "arguments": next(remaining)}}
                calls.append(call)
            message = {**message, "tool_calls": calls}
        rebuilt.append(message)
    return rebuilt


def _kind_of(request: Any) -> str:
    return "chat" if isinstance(request, (list, tuple)) else "complete"


def _tool_texts(options: Any) -> list[tuple[str, str]]:
    import json

    return [(f"tools[{index}]", json.dumps(tool)) for index, tool in enumerate(getattr(options, "tools", None) or [])]


class GuardedBackend(DelegatingBackend):
    """An endpoint's backend behind its AI Gateway guardrails (the stored ``guardrails`` dict)."""

    def __init__(self, inner: Backend, guardrails: dict[str, Any], endpoint_name: str = ""):
        super().__init__(inner)
        self.input = Guard("input", guardrails.get("input"))
        self.output = Guard("output", guardrails.get("output"))
        self.endpoint_name = endpoint_name

    def _check_input(self, item: Any, kind: str) -> tuple[Any, Verdict]:
        """The item to send (masked) and the input verdict: text that cannot be read, or PII or a
        keyword that appears only once a message's parts are joined, is blocked."""
        try:
            texts = _texts_of(item, kind)
        except _NotText as exc:
            return item, Verdict((), f"input guardrail blocked the request: {exc}", (), "input BLOCK (not text)")
        verdict = self.input.check(texts)
        if verdict.blocked:
            return item, verdict
        if verdict.kinds:
            item = _rebuilt(item, kind, verdict.texts)
        across = self.input.check(_joined_parts(item)) if kind == "chat" else Verdict(())
        if across.blocked or across.kinds:
            found = f"PII ({', '.join(across.kinds)})" if across.kinds else "an invalid keyword"
            return item, Verdict((), f"input guardrail blocked the request: {found} spans the text parts of a message, "
                                     f"where it cannot be masked; send the text in one part, or remove it", across.kinds,
                                 _joined(verdict.action, (across.action or "input BLOCK") + " across parts"))
        return item, verdict

    def _check_tools(self, options: Any) -> str | None:
        """Tool definitions go to the model too; PII or a keyword in them blocks the call (they
        are schemas, not text to mask)."""
        texts = _tool_texts(options) if self.input.active else []
        verdict = self.input.check(texts) if texts else Verdict(())
        if verdict.blocked or verdict.kinds:
            raise GuardrailBlocked("input guardrail blocked the request: the tools' definitions hold "
                                   + ("PII (" + ", ".join(verdict.kinds) + ")" if verdict.kinds else "an invalid keyword")
                                   + "; remove it from the tool descriptions", verdict.action or "input BLOCK (tools)")
        return None

    # -- batches -------------------------------------------------------------------------------

    def _guarded(self, items: Sequence[Any], kind: str, call: Callable[[list[Any], ResultCallback | None], list[Any]],
                 on_result: ResultCallback | None) -> list[Any]:
        results: list[Any] = [None] * len(items)
        positions, sent, notes = [], [], []
        for index, item in enumerate(items):
            note = None
            if self.input.active:
                item, verdict = self._check_input(item, kind)
                note = verdict.action
                if verdict.blocked:
                    results[index] = _failed(kind, verdict.blocked, note)
                    if on_result is not None:
                        on_result(index, results[index])
                    continue
            positions.append(index)
            sent.append(item)
            notes.append(note)
        if not sent:  # every row was blocked: nothing goes to the model
            return results
        checked: dict[int, tuple[tuple[str, ...], Verdict | None]] = {}

        def finish(local: int, answer: Any) -> Any:
            return self._answer(answer, notes[local], checked, local)

        def forward(local: int, answer: Any) -> None:
            on_result(positions[local], finish(local, answer))

        answers = call(sent, forward if on_result is not None else None)
        for local, answer in enumerate(answers):
            results[positions[local]] = finish(local, answer)
        return results

    def _answer(self, result: Any, note: str | None, checked: dict, local: int) -> Any:
        """One answer after the output guardrails, carrying what the guardrails did."""
        if result.error or not isinstance(result, GenerationResult) or not self.output.active:
            return dataclasses.replace(result, guardrail=note) if note else result
        places, texts = [], []
        for j, choice in enumerate(result.choices):  # each choice's text, then its tool calls' arguments
            places.append("the answer" if len(result.choices) == 1 else f"choices[{j}]")
            texts.append(choice.text or "")
            for k, call in enumerate(choice.tool_calls):
                places.append(f"choices[{j}].tool_calls[{k}].arguments")
                texts.append(call.arguments)
        texts = tuple(texts)
        cached = checked.get(local)  # the same answer seen by on_result: checked once
        if cached is not None and cached[0] == texts:
            verdict = cached[1]
        else:
            verdict = self.output.check(list(zip(places, texts)))
            checked[local] = (texts, verdict)
        note = _joined(note, verdict.action)
        if verdict.blocked:
            return GenerationResult(error=verdict.blocked, error_status=GuardrailBlocked.http_status,
                                    error_code=GuardrailBlocked.error_code, guardrail=note,
                                    prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                                    served_entity=result.served_entity)
        if verdict.kinds:
            masked = iter(verdict.texts)
            choices = []
            for choice in result.choices:
                text = next(masked)
                calls = tuple(dataclasses.replace(call, arguments=next(masked)) for call in choice.tool_calls)
                if text != choice.text or calls != choice.tool_calls:
                    choice = dataclasses.replace(choice, text=text, tool_calls=calls, logprobs=None)
                choices.append(choice)
            result = dataclasses.replace(result, choices=tuple(choices))
        return dataclasses.replace(result, guardrail=note) if note else result

    def chat(self, conversations, options, on_result=None):
        self._check_tools(options)
        return self._guarded(conversations, "chat", lambda part, cb: self.inner.chat(part, options, cb), on_result)

    def complete(self, prompts, options, on_result=None):
        return self._guarded(prompts, "complete", lambda part, cb: self.inner.complete(part, options, cb), on_result)

    def embed(self, texts, on_result=None):
        """Input guardrails only: an embedding answers a vector, with no text to check."""
        return self._guarded(texts, "embed", lambda part, cb: self.inner.embed(part, cb), on_result)

    def predict(self, rows, params=None, on_result=None):
        raise NotImplementedFeature(
            f"endpoint {self.endpoint_name!r} has ai_gateway.guardrails, which sqlinfer enforces on chat, completions and "
            f"embeddings only, not on custom-model predictions; remove the guardrails to query it")

    # -- streams -------------------------------------------------------------------------------

    def stream(self, request, options, chat) -> Iterator[StreamDelta]:
        """Input checked before the stream starts; with output guardrails, the whole answer is
        buffered, checked, and sent as one piece."""
        kind = "chat" if chat else "complete"
        note = None
        if chat:
            self._check_tools(options)
        if self.input.active:
            request, verdict = self._check_input(request, kind)
            note = verdict.action
            if verdict.blocked:
                raise GuardrailBlocked(verdict.blocked, note)
        if not self.output.active:
            for delta in self.inner.stream(request, options, chat):
                yield dataclasses.replace(delta, guardrail=note) if note else delta
            return
        pieces, calls, last = [], [], None
        for delta in self.inner.stream(request, options, chat):
            pieces.append(delta.text)
            calls.extend(delta.tool_calls)
            last = delta
        verdict = self.output.check([("the answer", "".join(pieces))]
                                    + [(f"tool_calls[{k}].arguments", call.arguments) for k, call in enumerate(calls)])
        note = _joined(note, verdict.action)
        if verdict.blocked:
            raise GuardrailBlocked(verdict.blocked, note)
        masked_calls = tuple(dataclasses.replace(call, arguments=arguments)
                             for call, arguments in zip(calls, verdict.texts[1:]))
        yield StreamDelta(text=verdict.text, finish_reason=last.finish_reason if last else "stop",
                          prompt_tokens=last.prompt_tokens if last else 0,
                          completion_tokens=last.completion_tokens if last else 0,
                          served_entity=last.served_entity if last else None, tool_calls=masked_calls, guardrail=note)

    # -- what the payload log keeps ------------------------------------------------------------

    def redact_request(self, request: Any) -> Any:
        """``request`` as the inference payload table keeps it: detected PII masked when the input
        guardrails look for PII (BLOCK or MASK), so the table never holds what they found."""
        if self.input.pii not in ("BLOCK", "MASK") or not isinstance(request, (str, list, tuple)):
            return request
        kind = _kind_of(request)
        try:
            texts = _texts_of(request, kind)
        except _NotText:
            return request
        return _rebuilt(request, kind, self.input.redact([text for _, text in texts]))


def _failed(kind: str, message: str, note: str | None) -> Any:
    """A row refused by a guardrail: 400, GUARDRAIL_BLOCKED, nothing sent to the model."""
    result_type = EmbeddingResult if kind == "embed" else GenerationResult
    return result_type(error=message, error_status=GuardrailBlocked.http_status, error_code=GuardrailBlocked.error_code,
                       guardrail=note)
