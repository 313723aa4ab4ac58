"""Which tokens of an example training learns from (the loss mask), from the tokenizer alone.

Chat examples train on the assistant messages only: each assistant message's tokens as the chat
template renders them, its end-of-turn marker included (so the model learns to stop), and
everything else (system, user, the template's role headers) is masked. The boundaries come from
rendering the conversation up to each assistant message (with the generation prompt) and through
it, which needs no `{% generation %}` tags in the template (SmolLM2's has none). A template that
renders a prefix differently from the whole conversation falls back to the message's content as
written (or stripped of surrounding whitespace, as some templates do), found in the rendering.

Prompt-completion examples train on the completion and the EOS token TRL appends, as TRL does
(the completion starts where the tokenized prompt and prompt+completion diverge). Text examples
train on every token (and the EOS appended).

API (a tokenizer is any `transformers` tokenizer; masks are lists of bools, True = trained):

- `assistant_token_mask(tokenizer, messages) -> (input_ids, mask)`
- `completion_token_mask(tokenizer, prompt, completion) -> (input_ids, mask)`
- `text_token_mask(tokenizer, text) -> (input_ids, mask)`
- `token_mask(tokenizer, record) -> (input_ids, mask)`: any normalised record (chat, prompt-
  completion or text, as `app.datasets.formats.parse_dataset` returns them)
- `mask_segments(tokenizer, record) -> list[Segment]`: the rendered example cut into runs of
  trained and masked text; the segments' texts concatenate to the rendered example
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Span = tuple[int, int]  # [start, end) in characters of the rendered text


@dataclass(frozen=True)
class Segment:
    text: str
    trained: bool
    tokens: int


@dataclass(frozen=True)
class _Rendered:
    text: str
    input_ids: list[int]
    starts: list[int]  # character where each token starts
    mask: list[bool]


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], *, prompt: bool = False) -> str:
    return str(
        tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=prompt)
    )


def assistant_spans(tokenizer: Any, messages: Sequence[dict[str, str]]) -> tuple[str, list[Span]]:
    """The rendered conversation and the character spans of its assistant messages."""
    full = _render(tokenizer, messages)
    spans: list[Span] = []
    cursor = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        span = None
        try:
            before = _render(tokenizer, messages[:index], prompt=True) if index else None
            through = _render(tokenizer, messages[: index + 1])
        except Exception:  # noqa: BLE001 - a template that cannot render a prefix: fall back
            before = through = None
        if (
            before is not None
            and through is not None
            and len(before) >= cursor
            and full.startswith(before)
            and full.startswith(through)
            and len(before) < len(through)
        ):
            span = (len(before), len(through))
        else:
            for content in (message["content"], message["content"].strip()):
                found = full.find(content, cursor) if content else -1
                if found >= 0:
                    span = (found, found + len(content))
                    break
        if span is not None:
            spans.append(span)
            cursor = span[1]
    return full, spans


def _token_starts(tokenizer: Any, text: str, **kwargs: Any) -> tuple[list[int], list[int]]:
    """Token ids of `text` and the character each token starts at."""
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, return_offsets_mapping=True, **kwargs)
        ids = list(encoded["input_ids"])
        # A token starts where the one before it ended: offsets of some tokenizers leave out a
        # token's leading space, which belongs to the token all the same.
        starts, last = [], 0
        for _start, end in encoded["offset_mapping"]:
            starts.append(last)
            last = max(last, int(end))
        return ids, starts
    # Slow tokenizers have no offsets: a token starts where the decoded prefix before it ends.
    ids = list(tokenizer(text, **kwargs)["input_ids"])
    starts = []
    for index in range(len(ids)):
        starts.append(min(len(text), len(tokenizer.decode(ids[:index]))))
    return ids, starts


def _masked(text: str, ids: list[int], starts: list[int], spans: Sequence[Span]) -> _Rendered:
    mask = [any(start <= at < end for start, end in spans) for at in starts]
    return _Rendered(text=text, input_ids=ids, starts=starts, mask=mask)


def _chat(tokenizer: Any, messages: Sequence[dict[str, str]]) -> _Rendered:
    text, spans = assistant_spans(tokenizer, messages)
    ids, starts = _token_starts(tokenizer, text, add_special_tokens=False)
    return _masked(text, ids, starts, spans)


def _eos(tokenizer: Any) -> str:
    return str(tokenizer.eos_token or "")


def _common_prefix(first: Sequence[int], second: Sequence[int]) -> int:
    length = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        length += 1
    return length


def _prompt_completion(tokenizer: Any, prompt: str, completion: str) -> _Rendered:
    eos = _eos(tokenizer)
    if eos and not completion.endswith(eos):
        completion += eos
    text = prompt + completion
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    ids, starts = _token_starts(tokenizer, text)
    trained_from = _common_prefix(prompt_ids, ids)
    mask = [index >= trained_from for index in range(len(ids))]
    return _Rendered(text=text, input_ids=ids, starts=starts, mask=mask)


def _text(tokenizer: Any, text: str) -> _Rendered:
    eos = _eos(tokenizer)
    if eos and not text.endswith(eos):
        text += eos
    ids, starts = _token_starts(tokenizer, text)
    return _Rendered(text=text, input_ids=ids, starts=starts, mask=[True] * len(ids))


def _prompt_only(tokenizer: Any, prompt: str | Sequence[dict[str, str]]) -> _Rendered:
    """A reinforcement prompt as the model reads it before answering: nothing in it is
    learned from directly (the model learns from the grades of what it writes)."""
    chat = not isinstance(prompt, str)
    text = prompt if isinstance(prompt, str) else _render(tokenizer, prompt, prompt=True)
    ids, starts = _token_starts(tokenizer, text, add_special_tokens=not chat)
    return _Rendered(text=text, input_ids=ids, starts=starts, mask=[False] * len(ids))


def prompt_ids(tokenizer: Any, prompt: str | Sequence[dict[str, str]]) -> list[int]:
    return _prompt_only(tokenizer, prompt).input_ids


def one_side(record: dict[str, Any], side: str) -> dict[str, Any]:
    """A preference row's prompt with its `chosen` or `rejected` answer, as a chat or
    prompt-completion row (what the preference loss scores)."""
    if isinstance(record["prompt"], list):
        return {"messages": [*record["prompt"], *record[side]]}
    return {"prompt": record["prompt"], "completion": record[side]}


def _render_record(tokenizer: Any, record: dict[str, Any]) -> _Rendered:
    if "chosen" in record:  # a preference row: shown with its chosen answer
        return _render_record(tokenizer, one_side(record, "chosen"))
    if "item" in record:  # a reinforcement prompt
        return _prompt_only(tokenizer, record["prompt"])
    if "messages" in record:
        return _chat(tokenizer, record["messages"])
    if "prompt" in record:
        return _prompt_completion(tokenizer, record["prompt"], record["completion"])
    return _text(tokenizer, record["text"])


def assistant_token_mask(
    tokenizer: Any, messages: Sequence[dict[str, str]]
) -> tuple[list[int], list[bool]]:
    rendered = _chat(tokenizer, messages)
    return rendered.input_ids, rendered.mask


def completion_token_mask(
    tokenizer: Any, prompt: str, completion: str
) -> tuple[list[int], list[bool]]:
    rendered = _prompt_completion(tokenizer, prompt, completion)
    return rendered.input_ids, rendered.mask


def text_token_mask(tokenizer: Any, text: str) -> tuple[list[int], list[bool]]:
    rendered = _text(tokenizer, text)
    return rendered.input_ids, rendered.mask


def token_mask(tokenizer: Any, record: dict[str, Any]) -> tuple[list[int], list[bool]]:
    rendered = _render_record(tokenizer, record)
    return rendered.input_ids, rendered.mask


def mask_segments(tokenizer: Any, record: dict[str, Any]) -> list[Segment]:
    """The rendered example as runs of trained and masked text, in order."""
    rendered = _render_record(tokenizer, record)
    segments: list[Segment] = []
    begin, count = 0, 0
    for index, trained in enumerate(rendered.mask):
        if index and trained != rendered.mask[index - 1]:
            cut = rendered.starts[index]
            segments.append(Segment(rendered.text[begin:cut], rendered.mask[index - 1], count))
            begin, count = cut, 0
        count += 1
    if rendered.mask:
        segments.append(Segment(rendered.text[begin:], rendered.mask[-1], count))
    elif rendered.text:
        segments.append(Segment(rendered.text, False, 0))
    return segments
