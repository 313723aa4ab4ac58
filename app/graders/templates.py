"""Grader templates: text with `{{item.<path>}}`, `{{sample.output_text}}` and
`{{sample.output_json[.<path>]}}` placeholders, as in OpenAI's graders.

- `item.<field>[.<key>...]`: a field of the dataset row; dotted keys go into nested objects and a
  number indexes a list (`{{item.choices.0}}`).
- `sample.output_text`: the completion being graded.
- `sample.output_json[.<path>]`: the completion parsed as strict JSON; a completion that is not
  JSON, or a path it lacks, renders as the empty string.

Whitespace inside the braces is allowed (`{{ item.answer }}`). Strings render as they are, any
other value as compact JSON. Templates are parsed once (cached) and checked at request time, so an
unknown namespace is a 422, never a surprise in the middle of training.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

PLACEHOLDER = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
SAMPLE_FIELDS = ("output_text", "output_json")


class _Missing:
    """The value of a path that is not there (distinct from a JSON null)."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


@dataclass(frozen=True)
class Placeholder:
    text: str  # as written, e.g. "{{ item.answer }}", for messages
    namespace: Literal["item", "sample"]
    path: tuple[str, ...]  # item: the row's keys; sample: ("output_text",) or ("output_json", ...)

    @property
    def canonical(self) -> str:
        return "{{" + ".".join((self.namespace, *self.path)) + "}}"


ParsedTemplate = tuple[str | Placeholder, ...]


class MissingItemField(Exception):
    """A template reads a row field (or nested key) that the row does not have."""

    def __init__(self, placeholder: Placeholder) -> None:
        super().__init__(f"the row has no value for {placeholder.canonical}")
        self.placeholder = placeholder


def _placeholder(text: str, expression: str) -> Placeholder:
    namespace, _, rest = expression.partition(".")
    segments = tuple(rest.split(".")) if rest else ()
    if any(not segment or segment != segment.strip() for segment in segments):
        raise ValueError(f"{text}: empty or blank path segment")
    if namespace == "item":
        if not segments:
            raise ValueError(f"{text}: name a field of the row, e.g. {{{{item.answer}}}}")
        return Placeholder(text, "item", segments)
    if namespace == "sample":
        if not segments or segments[0] not in SAMPLE_FIELDS:
            raise ValueError(
                f"{text}: unknown sample field; use {{{{sample.output_text}}}} or "
                "{{sample.output_json}}, optionally with a path: {{sample.output_json.answer}}"
            )
        if segments[0] == "output_text" and len(segments) > 1:
            raise ValueError(f"{text}: sample.output_text is text and has no fields")
        return Placeholder(text, "sample", segments)
    raise ValueError(
        f"{text}: unknown namespace {namespace!r}; placeholders read item.<field>, "
        "sample.output_text or sample.output_json"
    )


@functools.lru_cache(maxsize=1024)
def parse_template(template: str) -> ParsedTemplate:
    """Split a template into literal text and placeholders; a bad placeholder is a ValueError."""
    parts: list[str | Placeholder] = []
    position = 0
    for match in PLACEHOLDER.finditer(template):
        if match.start() > position:
            parts.append(template[position : match.start()])
        parts.append(_placeholder(match.group(0), match.group(1)))
        position = match.end()
    if position < len(template):
        parts.append(template[position:])
    return tuple(parts)


def placeholders(template: str) -> list[Placeholder]:
    return [part for part in parse_template(template) if isinstance(part, Placeholder)]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):  # 1e999
        raise ValueError(f"{text} is out of range")
    return number


def parse_json(text: str) -> Any:
    """Strict JSON (no NaN, Infinity or overflowing numbers); MISSING when `text` is not JSON."""
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        return MISSING


def resolve(value: Any, path: tuple[str, ...]) -> Any:
    """Follow `path` through objects (by key) and lists (by index); MISSING where it stops."""
    for segment in path:
        if isinstance(value, Mapping) and segment in value:
            value = value[segment]
        elif isinstance(value, list) and segment.isdecimal() and int(segment) < len(value):
            value = value[int(segment)]
        else:
            return MISSING
    return value


class Sample:
    """One completion; its JSON parse is done at most once, however many templates read it."""

    def __init__(self, output_text: str) -> None:
        self.output_text = output_text

    @functools.cached_property
    def output_json(self) -> Any:
        return parse_json(self.output_text)


def value_of(placeholder: Placeholder, item: Mapping[str, Any], sample: Sample) -> Any:
    """The placeholder's value; MissingItemField for an absent row field, MISSING for an absent
    part of the completion's JSON."""
    if placeholder.namespace == "item":
        value = resolve(item, placeholder.path)
        if value is MISSING:
            raise MissingItemField(placeholder)
        return value
    if placeholder.path == ("output_text",):
        return sample.output_text
    parsed = sample.output_json
    return MISSING if parsed is MISSING else resolve(parsed, placeholder.path[1:])


def to_text(value: Any) -> str:
    if value is MISSING:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def render(template: str, item: Mapping[str, Any], sample: Sample) -> str:
    return "".join(
        to_text(value_of(part, item, sample)) if isinstance(part, Placeholder) else part
        for part in parse_template(template)
    )


def render_value(template: str, item: Mapping[str, Any], sample: Sample) -> Any:
    """A template that is exactly one placeholder whose value is not a string stands for that
    value (an object stays an object); anything else is its rendered text parsed as JSON."""
    parts = parse_template(template)
    if len(parts) == 1 and isinstance(parts[0], Placeholder):
        value = value_of(parts[0], item, sample)
        if value is not MISSING and not isinstance(value, str):
            return value
    return parse_json(render(template, item, sample))
